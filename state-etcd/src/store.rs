//! [`EtcdStore`]: the state store's records in etcd, under one key prefix.
//!
//! | key (under `PREFIX/`) | value |
//! |---|---|
//! | `meta/format_version` | the records' format (`reconciler::state::STATE_FORMAT_VERSION`) |
//! | `meta/placement`, `meta/applied`, `meta/protected` | as in `state.redb`'s `meta` (JSON; the placement as a large value, below) |
//! | `meta/lock` | the apply lock (`LockInfo` JSON), attached to the leader's election lease |
//! | `plans/EXECUTION_ID` | the execution's `PlanRecord` (a large value) |
//! | `plan-heads/EXECUTION_ID` | its head: `{finished, started_at_unix_ms}` (every sync asks which executions are unfinished; a first apply's record is a hundred MB) |
//! | `journal/EXECUTION_ID/STEP` | one step's `StepRecord` (step zero-padded to 6) |
//! | `audit/SEQ` | one sealed audit entry (seq zero-padded to 20) |
//! | `chunks/KEY/GENERATION/N` | chunk N of a large value's generation |
//! | `election` | the leader (`crate::election`) |
//! | `controller/NAME` | the controller's shared records (`applied`: the applied commit; `maintenance`: the nodes in maintenance) |
//! | `leases/NODE` | a node's last lease grant by any replica (`crate::node_leases`) |
//!
//! etcd takes at most 1.5 MiB per request and 128 operations per transaction by
//! default. A value up to 512 KiB is stored as it is; a larger one (the placement of
//! a big cloud, a big plan) is written as a new generation of 1 MiB chunks, each in a
//! request of its own, and then made current by one transaction that flips the key to
//! a pointer (`cairn-chunked:{generation, chunks, len, sha256}`) and deletes every
//! other generation. A reader reads the pointer and then the chunks at the pointer's
//! revision, so it sees one generation whole, whatever a writer does meanwhile.
//!
//! Every write of a store opened with an election ([`EtcdStore::with_election`]) is a
//! transaction that compares the election key's create revision with this leader's
//! fencing token, and is refused before it is sent once the leader's own timer says
//! it may no longer act: a deposed leader writes nothing.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp,
};
use reconciler::audit::{AuditEntry, Record};
use reconciler::desired::Placement;
use reconciler::state::{
    Applied, ExecutionHead, LockInfo, PlanRecord, STATE_FORMAT_VERSION, StateError, StateStore,
    StepRecord, hostname, now_ms, process_alive, random_id,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};

use crate::election::Election;

/// Values up to this size are stored as they are.
pub(crate) const INLINE_MAX: usize = 512 * 1024;
/// The chunk size of larger values (one chunk per request, under etcd's 1.5 MiB).
pub(crate) const CHUNK: usize = 1024 * 1024;
/// Operations per transaction (etcd allows 128; one is left for the fencing compare).
const MAX_OPS: usize = 100;
/// Keys per page when reading a prefix.
const PAGE: i64 = 500;
/// How long one etcd call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A large value's pointer starts with this.
const POINTER: &[u8] = b"cairn-chunked:";

/// Where the store is: `etcd://HOST:PORT[,HOST:PORT…]/PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `HOST:PORT` of each etcd member.
    pub endpoints: Vec<String>,
    /// The key prefix, `/PREFIX` (no trailing slash).
    pub prefix: String,
}

impl Target {
    /// Parses `etcd://HOST:PORT[,HOST:PORT…]/PREFIX`.
    pub fn parse(url: &str) -> Result<Target, String> {
        let form =
            "expected etcd://HOST:PORT[,HOST:PORT…]/PREFIX, e.g. etcd://127.0.0.1:2379/cairn";
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("`{url}` is not an etcd URL: {form}"))?;
        let (hosts, prefix) = rest
            .split_once('/')
            .ok_or_else(|| format!("`{url}` names no key prefix: {form}"))?;
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            return Err(format!("`{url}` names no key prefix: {form}"));
        }
        let mut endpoints = vec![];
        for host in hosts.split(',') {
            let port = host.rsplit_once(':').map(|(_, p)| p);
            if host.is_empty() || port.is_none_or(|p| p.parse::<u16>().is_err()) {
                return Err(format!(
                    "`{url}`: `{host}` is not HOST:PORT (an etcd client URL without scheme, e.g. 127.0.0.1:2379)"
                ));
            }
            endpoints.push(host.to_owned());
        }
        Ok(Target {
            endpoints,
            prefix: format!("/{prefix}"),
        })
    }

    /// The URL it was parsed from (normalized).
    pub fn url(&self) -> String {
        format!(
            "etcd://{}/{}",
            self.endpoints.join(","),
            self.prefix.trim_start_matches('/')
        )
    }

    /// A key under the prefix.
    pub fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }
}

/// The store's own runtime (the `StateStore` trait is synchronous and is called
/// from inside the controller's runtime, which must not be blocked on itself).
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// The state store in etcd. Cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct EtcdStore {
    target: Target,
    url: String,
    client: Client,
    runtime: Arc<Runtime>,
    audit_key: Option<(proto::auth::Identity, proto::anchor::SharedHead)>,
    election: Option<Arc<Election>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("url", &self.url).finish()
    }
}

/// A large value's pointer.
#[derive(Debug, Serialize, Deserialize)]
struct Pointer {
    generation: String,
    chunks: usize,
    len: usize,
    sha256: String,
}

/// The end of the key range of a prefix (its last byte plus one).
pub(crate) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

impl EtcdStore {
    /// Connects to the store at `url` (`etcd://…`) and checks its records' format.
    pub fn open(url: &str) -> Result<EtcdStore, StateError> {
        let store = EtcdStore::connect(url)?;
        // etcd may still be starting (or busy): retried for 10 s.
        let deadline = std::time::Instant::now() + CALL_TIMEOUT;
        loop {
            match store.check_format() {
                Err(StateError::Etcd { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                done => return done.map(|()| store),
            }
        }
    }

    /// Connects to the store at `url` without looking at its records (a backup or a
    /// restore looks at them itself).
    pub(crate) fn connect(url: &str) -> Result<EtcdStore, StateError> {
        let target = Target::parse(url).map_err(|message| StateError::Etcd {
            url: url.to_owned(),
            operation: "parse",
            message,
        })?;
        let url = target.url();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cairn-etcd")
            .enable_all()
            .build()
            .map_err(|e| StateError::Etcd {
                url: url.clone(),
                operation: "start runtime",
                message: e.to_string(),
            })?;
        let runtime = Arc::new(Runtime(Some(runtime)));
        let endpoints = target.endpoints.clone();
        let connect = async move {
            Client::connect(
                endpoints,
                Some(
                    ConnectOptions::new()
                        .with_connect_timeout(Duration::from_secs(3))
                        .with_timeout(CALL_TIMEOUT)
                        // Lenient: a busy machine missed 2 s pings and tore the
                        // connection down at start.
                        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(10)),
                ),
            )
            .await
        };
        let client = block(&runtime, &url, "connect", connect)?;
        Ok(EtcdStore {
            target,
            url,
            client,
            runtime,
            audit_key: None,
            election: None,
        })
    }

    /// The store's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where it is.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The connection (for the election).
    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs `future` on the store's runtime.
    pub(crate) fn spawn(&self, future: impl Future<Output = ()> + Send + 'static) {
        if let Some(runtime) = &self.runtime.0 {
            runtime.spawn(future);
        }
    }

    /// Writes only as the leader of `election`: each write compares its fencing token.
    pub fn with_election(mut self, election: Arc<Election>) -> EtcdStore {
        self.election = Some(election);
        self
    }

    /// The same store, its writes not fenced (records every replica writes).
    pub(crate) fn unfenced(&self) -> EtcdStore {
        EtcdStore {
            election: None,
            ..self.clone()
        }
    }

    /// The election the store's writes are fenced by.
    pub fn election(&self) -> Option<&Arc<Election>> {
        self.election.as_ref()
    }

    /// Signs audit entries with `identity` (the controller key) and keeps `head` at the
    /// log's head (`proto::anchor`).
    pub fn with_audit_key(
        mut self,
        identity: proto::auth::Identity,
        head: proto::anchor::SharedHead,
    ) -> Result<EtcdStore, StateError> {
        if let Some(current) = self.audit_head()? {
            head.advance(current);
        }
        self.audit_key = Some((identity, head));
        Ok(self)
    }

    fn check_format(&self) -> Result<(), StateError> {
        let key = self.target.key("meta/format_version");
        let restoring = self.target.key(crate::backup::RESTORING);
        if let Some((sha, _, _)) = self.get(crate::backup::RESTORING)? {
            return Err(crate::backup::unfinished(self, &sha));
        }
        match self.get_json::<u32>("meta/format_version")? {
            Some(found) if found > STATE_FORMAT_VERSION => Err(StateError::Newer {
                path: self.url.clone(),
                found,
            }),
            Some(_) => Ok(()),
            None => {
                // Not fenced: every replica writes the same value, once.
                let bytes = serde_json::to_vec(&STATE_FORMAT_VERSION).expect("numbers serialize");
                // Not while a restore began meanwhile (it writes the version last).
                let txn = Txn::new()
                    .when([
                        Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                        Compare::create_revision(restoring, CompareOp::Equal, 0),
                    ])
                    .and_then([TxnOp::put(key, bytes, None)]);
                let mut client = self.client.clone();
                let written =
                    self.run("write format version", async move { client.txn(txn).await })?;
                if !written.succeeded()
                    && let Some((sha, _, _)) = self.get(crate::backup::RESTORING)?
                {
                    return Err(crate::backup::unfinished(self, &sha));
                }
                Ok(())
            }
        }
    }

    pub(crate) fn run<T: Send + 'static>(
        &self,
        operation: &'static str,
        future: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> Result<T, StateError> {
        block(&self.runtime, &self.url, operation, future)
    }

    fn fenced(&self, why: impl Into<String>) -> StateError {
        StateError::Fenced {
            url: self.url.clone(),
            why: why.into(),
        }
    }

    /// The fencing compare of a write (none without an election).
    fn guard(&self) -> Result<Option<(i64, Compare)>, StateError> {
        let Some(election) = &self.election else {
            return Ok(None);
        };
        let token = election.acting_token().map_err(|why| self.fenced(why))?;
        Ok(Some((
            token,
            Compare::create_revision(
                election.key(),
                CompareOp::Equal,
                election.revision_of(token),
            ),
        )))
    }

    /// Commits `ops` when `compares` hold (and, with an election, the fencing token):
    /// `Ok(false)` when one of `compares` failed; a failed fencing compare is an error.
    pub(crate) fn commit(
        &self,
        operation: &'static str,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<bool, StateError> {
        let guard = self.guard()?;
        let mut all = compares;
        if let Some((_, compare)) = &guard {
            all.push(compare.clone());
        }
        let txn = Txn::new().when(all).and_then(ops);
        let mut client = self.client.clone();
        let response = self.run(operation, async move { client.txn(txn).await })?;
        if response.succeeded() {
            return Ok(true);
        }
        if let (Some((token, _)), Some(election)) = (guard, &self.election) {
            let key = election.key().to_owned();
            let mut client = self.client.clone();
            let current = self.run(operation, async move { client.get(key, None).await })?;
            let now = current.kvs().first().map(|kv| kv.create_revision());
            let revision = election.revision_of(token);
            if now != Some(revision) {
                election.deposed(token);
                return Err(self.fenced(format!(
                    "this controller's fencing token {token} (election revision {revision}) is no longer the election key's create revision ({}): another controller leads",
                    now.map_or_else(|| "no leader".to_owned(), |r| r.to_string())
                )));
            }
        }
        Ok(false)
    }

    /// Writes `ops` (fenced), in one transaction.
    fn write(&self, operation: &'static str, ops: Vec<TxnOp>) -> Result<(), StateError> {
        self.commit(operation, vec![], ops)?;
        Ok(())
    }

    pub(crate) fn get(&self, rest: &str) -> Result<Option<(Vec<u8>, i64, i64)>, StateError> {
        let key = self.target.key(rest);
        let mut client = self.client.clone();
        let response = self.run("get", async move { client.get(key, None).await })?;
        let revision = response.header().map_or(0, |h| h.revision());
        Ok(response
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision(), revision)))
    }

    /// A value, reassembled from its chunks when it is large.
    fn get_value(&self, rest: &str) -> Result<Option<Vec<u8>>, StateError> {
        let Some((value, _, revision)) = self.get(rest)? else {
            return Ok(None);
        };
        let Some(pointer) = value.strip_prefix(POINTER) else {
            return Ok(Some(value));
        };
        let pointer: Pointer =
            serde_json::from_slice(pointer).map_err(|source| StateError::Corrupt {
                path: self.url.clone(),
                key: rest.to_owned(),
                source,
            })?;
        let mut bytes = Vec::with_capacity(pointer.len);
        for n in 0..pointer.chunks {
            let key = self
                .target
                .key(&format!("chunks/{rest}/{}/{n:06}", pointer.generation));
            let mut client = self.client.clone();
            let response = self.run("get chunk", async move {
                client
                    .get(key, Some(GetOptions::new().with_revision(revision)))
                    .await
            })?;
            let Some(kv) = response.kvs().first() else {
                return Err(self.corrupt_value(rest, &format!("chunk {n} is missing")));
            };
            bytes.extend_from_slice(kv.value());
        }
        let digest = proto::auth::to_hex(&Sha256::digest(&bytes));
        if bytes.len() != pointer.len || digest != pointer.sha256 {
            return Err(self.corrupt_value(
                rest,
                &format!(
                    "its chunks hold {} bytes with SHA-256 {digest}, the pointer says {} bytes with {}",
                    bytes.len(),
                    pointer.len,
                    pointer.sha256
                ),
            ));
        }
        Ok(Some(bytes))
    }

    fn corrupt_value(&self, key: &str, why: &str) -> StateError {
        StateError::Etcd {
            url: self.url.clone(),
            operation: "read chunked value",
            message: format!("`{key}`: {why}"),
        }
    }

    /// Writes a value: as it is when small, else as a new generation of chunks and
    /// one transaction that flips the key to it and drops every other generation.
    fn put_value(&self, rest: &str, bytes: Vec<u8>) -> Result<(), StateError> {
        let key = self.target.key(rest);
        let chunks = self.target.key(&format!("chunks/{rest}/"));
        let drop_all = TxnOp::delete(
            chunks.clone(),
            Some(DeleteOptions::new().with_range(prefix_end(&chunks))),
        );
        if bytes.len() <= INLINE_MAX {
            return self.write("put", vec![TxnOp::put(key, bytes, None), drop_all]);
        }
        let generation = random_id();
        let this = format!("{chunks}{generation}/");
        let count = bytes.len().div_ceil(CHUNK);
        for (n, chunk) in bytes.chunks(CHUNK).enumerate() {
            self.write(
                "put chunk",
                vec![TxnOp::put(format!("{this}{n:06}"), chunk.to_vec(), None)],
            )?;
        }
        let pointer = Pointer {
            generation,
            chunks: count,
            len: bytes.len(),
            sha256: proto::auth::to_hex(&Sha256::digest(&bytes)),
        };
        let mut value = POINTER.to_vec();
        value.extend(serde_json::to_vec(&pointer).expect("pointers serialize"));
        self.write(
            "flip large value",
            vec![
                TxnOp::put(key, value, None),
                TxnOp::delete(
                    chunks.clone(),
                    Some(DeleteOptions::new().with_range(this.clone())),
                ),
                TxnOp::delete(
                    prefix_end(&this),
                    Some(DeleteOptions::new().with_range(prefix_end(&chunks))),
                ),
            ],
        )
    }

    /// A record of the controller's own under `PREFIX/controller/NAME` (the applied
    /// commit, the nodes in maintenance: what every replica must see the same), as
    /// JSON; `None` when absent.
    pub fn controller_record<T: DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, StateError> {
        self.get_json(&format!("controller/{name}"))
    }

    /// Writes [`EtcdStore::controller_record`] `name` (fenced like every write: only
    /// the leader's lands).
    pub fn set_controller_record<T: Serialize>(
        &self,
        name: &str,
        value: &T,
    ) -> Result<(), StateError> {
        self.put_json(&format!("controller/{name}"), value)
    }

    fn get_json<T: DeserializeOwned>(&self, rest: &str) -> Result<Option<T>, StateError> {
        let Some(bytes) = self.get_value(rest)? else {
            return Ok(None);
        };
        self.decode(rest, &bytes).map(Some)
    }

    pub(crate) fn decode<T: DeserializeOwned>(
        &self,
        key: &str,
        bytes: &[u8],
    ) -> Result<T, StateError> {
        serde_json::from_slice(bytes).map_err(|source| StateError::Corrupt {
            path: self.url.clone(),
            key: key.to_owned(),
            source,
        })
    }

    /// Writes an execution's record, then its head.
    fn put_execution(&self, id: &str, record: &PlanRecord) -> Result<(), StateError> {
        self.put_json(&format!("plans/{id}"), record)?;
        self.put_json(&format!("plan-heads/{id}"), &ExecutionHead::of(record))
    }

    /// Every execution's head, oldest first (equal starts in id order). An execution
    /// without one (written before heads were kept) is read whole, and its head
    /// written when this store may write.
    fn heads(&self) -> Result<Vec<(String, ExecutionHead)>, StateError> {
        let mut heads = std::collections::BTreeMap::new();
        for (key, bytes) in self.range("plan-heads/", false)? {
            let head: ExecutionHead = self.decode(&key, &bytes)?;
            heads.insert(key["plan-heads/".len()..].to_owned(), head);
        }
        for (key, _) in self.range("plans/", true)? {
            let id = &key["plans/".len()..];
            if heads.contains_key(id) {
                continue;
            }
            if let Some(record) = self.get_json::<PlanRecord>(&key)? {
                let head = ExecutionHead::of(&record);
                // Best effort: a follower's store (or a deposed leader's) writes
                // nothing, and reads the record whole again next time.
                let _ = self.put_json(&format!("plan-heads/{id}"), &head);
                heads.insert(id.to_owned(), head);
            }
        }
        let mut heads: Vec<_> = heads.into_iter().collect();
        heads.sort_by_key(|(_, head)| head.started_at_unix_ms);
        Ok(heads)
    }

    fn put_json<T: Serialize>(&self, rest: &str, value: &T) -> Result<(), StateError> {
        self.put_value(
            rest,
            serde_json::to_vec(value).expect("state records serialize"),
        )
    }

    /// Every key under `PREFIX/rest` (keys relative to `PREFIX/`) with its value, in
    /// key order, read in pages at one revision.
    pub(crate) fn range(
        &self,
        rest: &str,
        keys_only: bool,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let start = self.target.key(rest);
        let end = prefix_end(&start);
        let strip = self.target.prefix.len() + 1;
        let mut out = vec![];
        let mut from = start.into_bytes();
        let mut revision = 0;
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE)
                .with_revision(revision);
            if keys_only {
                options = options.with_keys_only();
            }
            let mut client = self.client.clone();
            let key = from.clone();
            let response =
                self.run("range", async move { client.get(key, Some(options)).await })?;
            if revision == 0 {
                revision = response.header().map_or(0, |h| h.revision());
            }
            let kvs = response.kvs();
            for kv in kvs {
                let key = String::from_utf8_lossy(kv.key());
                out.push((key[strip.min(key.len())..].to_owned(), kv.value().to_vec()));
            }
            match kvs.last() {
                Some(last) if response.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// The stored audit records, raw, in seq order (for `reconciler::audit::verify`).
    pub fn audit_records(&self) -> Result<Vec<(u64, Vec<u8>)>, StateError> {
        Ok(self
            .range("audit/", false)?
            .into_iter()
            .filter_map(|(key, value)| {
                let seq = key.strip_prefix("audit/")?.parse().ok()?;
                Some((seq, value))
            })
            .collect())
    }

    /// Up to `limit` audit records whose keys sort before `before` (the end of the
    /// `audit/` range for the newest), newest first.
    fn audit_newest(&self, before: Vec<u8>, limit: usize) -> Result<Vec<KeyValue>, StateError> {
        let start = self.target.key("audit/");
        let options = GetOptions::new()
            .with_range(before)
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(limit as i64);
        let mut client = self.client.clone();
        let mut response = self.run("read the newest audit records", async move {
            client.get(start, Some(options)).await
        })?;
        Ok(response.take_kvs())
    }

    /// The newest audit record: its seq and bytes.
    fn audit_last(&self) -> Result<Option<(u64, Vec<u8>)>, StateError> {
        let start = self.target.key("audit/");
        let newest = self.audit_newest(prefix_end(&start), 1)?;
        Ok(newest.first().and_then(|kv| {
            let key = String::from_utf8_lossy(kv.key());
            let seq = key.get(start.len()..)?.parse().ok()?;
            Some((seq, kv.value().to_vec()))
        }))
    }

    /// The audit log's head (its newest chained entry).
    pub fn audit_head(&self) -> Result<Option<proto::anchor::Head>, StateError> {
        Ok(self
            .audit_last()?
            .and_then(|record| reconciler::audit::head_of(&[record])))
    }

    fn journal_key(execution_id: &str, step: usize) -> String {
        format!("journal/{execution_id}/{step:06}")
    }
}

fn block<T: Send + 'static>(
    runtime: &Runtime,
    url: &str,
    operation: &'static str,
    future: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
) -> Result<T, StateError> {
    let error = |message: String| StateError::Etcd {
        url: url.to_owned(),
        operation,
        message,
    };
    let Some(runtime) = &runtime.0 else {
        return Err(error("the store's runtime is gone".to_owned()));
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let result = tokio::time::timeout(CALL_TIMEOUT, future).await;
        let _ = tx.send(result);
    });
    match rx.recv() {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(e))) => Err(error(e.to_string())),
        Ok(Err(_)) => Err(error(format!(
            "no answer within {} s",
            CALL_TIMEOUT.as_secs()
        ))),
        Err(_) => Err(error("the store's runtime stopped".to_owned())),
    }
}

impl StateStore for EtcdStore {
    fn placement(&self) -> Result<Option<Placement>, StateError> {
        self.get_json("meta/placement")
    }

    fn set_placement(&self, placement: &Placement) -> Result<(), StateError> {
        self.put_json("meta/placement", placement)
    }

    fn protected_volumes(&self) -> Result<std::collections::BTreeSet<String>, StateError> {
        Ok(self.get_json("meta/protected")?.unwrap_or_default())
    }

    fn set_protected_volumes(
        &self,
        volumes: &std::collections::BTreeSet<String>,
    ) -> Result<(), StateError> {
        self.put_json("meta/protected", volumes)
    }

    fn applied(&self) -> Result<Option<Applied>, StateError> {
        self.get_json("meta/applied")
    }

    fn set_applied(&self, applied: &Applied) -> Result<(), StateError> {
        self.put_json("meta/applied", applied)
    }

    fn lock_holder(&self) -> Result<Option<LockInfo>, StateError> {
        self.get_json("meta/lock")
    }

    /// Takes the apply lock in a transaction on the lock key's revision. With an
    /// election the lock lives on the leader's lease: it goes with a dead leader.
    fn lock(&self, command: &str) -> Result<(LockInfo, Option<LockInfo>), StateError> {
        let host = hostname();
        let mine = LockInfo {
            id: random_id(),
            pid: std::process::id(),
            host: host.clone(),
            since_unix_ms: now_ms(),
            command: command.to_owned(),
        };
        let key = self.target.key("meta/lock");
        let options = self
            .election
            .as_ref()
            .and_then(|e| e.lease())
            .map(|lease| PutOptions::new().with_lease(lease));
        for _ in 0..10 {
            let current = self.get("meta/lock")?;
            let (previous, revision) = match &current {
                Some((bytes, revision, _)) => {
                    let holder: Option<LockInfo> = serde_json::from_slice(bytes).ok();
                    if let Some(holder) = &holder {
                        let dead_here = holder.host == host && !process_alive(holder.pid);
                        if !dead_here {
                            return Err(StateError::Locked {
                                id: holder.id.clone(),
                                pid: holder.pid,
                                host: holder.host.clone(),
                                since_unix_ms: holder.since_unix_ms,
                                command: holder.command.clone(),
                            });
                        }
                    }
                    (holder, *revision)
                }
                None => (None, 0),
            };
            let bytes = serde_json::to_vec(&mine).expect("lock serializes");
            if self.commit(
                "take lock",
                vec![Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    revision,
                )],
                vec![TxnOp::put(key.clone(), bytes, options.clone())],
            )? {
                return Ok((mine, previous));
            }
        }
        Err(StateError::Etcd {
            url: self.url.clone(),
            operation: "take lock",
            message: "the lock changed under every one of 10 attempts".to_owned(),
        })
    }

    fn unlock(&self, id: &str) -> Result<(), StateError> {
        let key = self.target.key("meta/lock");
        let current = self.get("meta/lock")?;
        let holder = current
            .as_ref()
            .and_then(|(bytes, _, _)| serde_json::from_slice::<LockInfo>(bytes).ok());
        match (holder, current) {
            (Some(holder), Some((_, revision, _))) if holder.id == id => {
                self.commit(
                    "release lock",
                    vec![Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        revision,
                    )],
                    vec![TxnOp::delete(key, None)],
                )?;
                Ok(())
            }
            (other, _) => Err(StateError::WrongLockId {
                given: id.to_owned(),
                current: other.map(|h| h.id),
            }),
        }
    }

    fn start_execution(&self, record: &PlanRecord) -> Result<(), StateError> {
        self.put_execution(&record.execution_id, record)
    }

    /// Reads only the unfinished executions' records (their heads say which).
    fn unfinished_executions(&self) -> Result<Vec<(String, PlanRecord)>, StateError> {
        let mut out = vec![];
        for (id, head) in self.heads()? {
            if head.finished {
                continue;
            }
            // The head is written after the record: a record is never finished
            // behind an unfinished head for long, but it is checked.
            if let Some(record) = self.get_json::<PlanRecord>(&format!("plans/{id}"))?
                && !record.finished
            {
                out.push((id, record));
            }
        }
        Ok(out)
    }

    fn last_execution(&self) -> Result<Option<(String, PlanRecord)>, StateError> {
        let Some((id, _)) = self.heads()?.pop() else {
            return Ok(None);
        };
        Ok(self
            .get_json::<PlanRecord>(&format!("plans/{id}"))?
            .map(|record| (id, record)))
    }

    fn executions(&self) -> Result<Vec<(String, PlanRecord)>, StateError> {
        let mut out = vec![];
        for (key, _) in self.range("plans/", true)? {
            let Some(record) = self.get_json::<PlanRecord>(&key)? else {
                continue;
            };
            let id = key.trim_start_matches("plans/").to_owned();
            out.push((id, record));
        }
        out.sort_by_key(|(_, r)| r.started_at_unix_ms);
        Ok(out)
    }

    fn finish_execution(
        &self,
        execution_id: &str,
        ended: Option<String>,
    ) -> Result<(), StateError> {
        let key = format!("plans/{execution_id}");
        if let Some(mut record) = self.get_json::<PlanRecord>(&key)? {
            record.finished = true;
            record.ended = ended;
            self.put_execution(execution_id, &record)?;
        }
        Ok(())
    }

    fn journal(&self, execution_id: &str, record: &StepRecord) -> Result<(), StateError> {
        self.journal_many(execution_id, std::slice::from_ref(record))
    }

    /// One fenced transaction per 100 records.
    fn journal_many(&self, execution_id: &str, records: &[StepRecord]) -> Result<(), StateError> {
        for batch in records.chunks(MAX_OPS) {
            let ops = batch
                .iter()
                .map(|record| {
                    TxnOp::put(
                        self.target
                            .key(&Self::journal_key(execution_id, record.step)),
                        serde_json::to_vec(record).expect("state records serialize"),
                        None,
                    )
                })
                .collect();
            self.write("journal", ops)?;
        }
        Ok(())
    }

    fn journal_of(&self, execution_id: &str) -> Result<Vec<StepRecord>, StateError> {
        self.range(&format!("journal/{execution_id}/"), false)?
            .into_iter()
            .map(|(key, value)| self.decode(&key, &value))
            .collect()
    }

    /// Appends one sealed entry: a transaction that writes seq N + 1 only if nobody
    /// wrote it first (then it reads the head again), so the chain never forks.
    fn audit(&self, event: &str, detail: serde_json::Value) -> Result<(), StateError> {
        let Some((identity, head)) = &self.audit_key else {
            return Err(StateError::AuditUnsigned {
                path: self.url.clone(),
                event: event.to_owned(),
            });
        };
        let entry = AuditEntry {
            at_unix_ms: now_ms(),
            user: std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned()),
            event: event.to_owned(),
            detail,
        };
        for _ in 0..20 {
            let (seq, prev) = match self.audit_last()? {
                None => (1, [0; 32]),
                Some((seq, bytes)) => match Record::decode(&bytes) {
                    Record::Sealed(s) => (
                        seq + 1,
                        proto::auth::from_hex::<32>(&s.hash).unwrap_or([0; 32]),
                    ),
                    _ => (seq + 1, [0; 32]),
                },
            };
            let sealed = reconciler::audit::seal(identity, seq, prev, entry.clone());
            let key = self.target.key(&format!("audit/{seq:020}"));
            let bytes = serde_json::to_vec(&sealed).expect("audit entries serialize");
            if self.commit(
                "append audit entry",
                vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
                vec![TxnOp::put(key, bytes, None)],
            )? {
                let hash = proto::auth::from_hex::<32>(&sealed.hash).expect("hashes are hex");
                head.advance(proto::anchor::Head { seq, hash });
                return Ok(());
            }
        }
        Err(StateError::Etcd {
            url: self.url.clone(),
            operation: "append audit entry",
            message: "another writer appended first 20 times in a row".to_owned(),
        })
    }

    fn audit_log(&self) -> Result<Vec<AuditEntry>, StateError> {
        Ok(self
            .audit_records()?
            .into_iter()
            .filter_map(|(_, bytes)| Record::decode(&bytes).entry())
            .collect())
    }

    /// The newest records only (a range sorted by key, descending, limited), each
    /// decoded in brief.
    fn recent_audit(&self, n: usize) -> Result<Vec<AuditEntry>, StateError> {
        if n == 0 {
            return Ok(vec![]);
        }
        let mut before = prefix_end(&self.target.key("audit/"));
        let mut out = vec![];
        // Records that do not decode are left out, as in `audit_log`: read on
        // past them, a page at a time.
        loop {
            let wanted = n - out.len();
            let page = self.audit_newest(before, wanted)?;
            let full = page.len() == wanted;
            for kv in &page {
                out.extend(reconciler::audit::brief::decode(kv.value()));
            }
            match page.last() {
                // The range's end is exclusive: the next page is older than this.
                Some(oldest) if full && out.len() < n => before = oldest.key().to_vec(),
                _ => break,
            }
        }
        out.reverse();
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::Etcd;
    use reconciler::state::StepStatus;

    /// etcd on 127.0.0.31 at `port` (its peers at `port + 1`: tests must not share
    /// either), or `None` with the reason printed when there is no etcd binary.
    /// Any other failure to start fails the test.
    pub(crate) fn etcd(port: u16) -> Option<(Etcd, tempfile::TempDir)> {
        etcd_on("127.0.0.31", port)
    }

    /// [`etcd`] on `host`.
    pub(crate) fn etcd_on(host: &str, port: u16) -> Option<(Etcd, tempfile::TempDir)> {
        if let Err(why) = crate::testing::binary() {
            eprintln!("skipped: {why}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        Some((
            Etcd::start(host, port, dir.path()).expect("etcd starts"),
            dir,
        ))
    }

    fn step(step: usize, status: StepStatus) -> StepRecord {
        StepRecord {
            step,
            request_id: format!("e.{step}"),
            status,
            replayed: false,
            attempts: 1,
            error: None,
            at_unix_ms: 1,
        }
    }

    #[test]
    fn a_url_names_endpoints_and_a_prefix() {
        let t = Target::parse("etcd://127.0.0.1:2379,10.0.0.2:2379/cairn/prod/").unwrap();
        assert_eq!(t.endpoints, vec!["127.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!(t.prefix, "/cairn/prod");
        assert_eq!(t.url(), "etcd://127.0.0.1:2379,10.0.0.2:2379/cairn/prod");
        for bad in [
            "/var/lib/state.redb",
            "etcd://127.0.0.1:2379",
            "etcd://127.0.0.1:2379/",
            "etcd://127.0.0.1/cairn",
        ] {
            let err = Target::parse(bad).unwrap_err();
            assert!(
                err.contains("etcd://HOST:PORT") || err.contains("HOST:PORT"),
                "{err}"
            );
        }
    }

    #[test]
    fn the_etcd_store_keeps_the_records_the_redb_store_keeps() {
        let Some((etcd, _dir)) = etcd(23790) else {
            return;
        };
        let identity = proto::auth::Identity::generate().unwrap();
        let head = proto::anchor::SharedHead::default();
        let store = EtcdStore::open(&etcd.url("t1"))
            .unwrap()
            .with_audit_key(identity.clone(), head.clone())
            .unwrap();
        assert!(store.placement().unwrap().is_none());
        let volumes: std::collections::BTreeSet<String> = ["db".to_owned()].into();
        store.set_protected_volumes(&volumes).unwrap();
        assert_eq!(store.protected_volumes().unwrap(), volumes);
        let applied = Applied {
            revision: "r".into(),
            plan_id: "p".into(),
            at_unix_ms: 5,
        };
        store.set_applied(&applied).unwrap();
        assert_eq!(store.applied().unwrap(), Some(applied));
        // The lock: a live holder is refused, the wrong id is named.
        let (mine, previous) = store.lock("cairn controller").unwrap();
        assert!(previous.is_none());
        assert!(matches!(
            store.lock("again"),
            Err(StateError::Locked { id, .. }) if id == mine.id
        ));
        assert!(matches!(
            store.unlock("nope"),
            Err(StateError::WrongLockId { .. })
        ));
        store.unlock(&mine.id).unwrap();
        assert!(store.lock_holder().unwrap().is_none());
        // Executions and a journal of 250 steps written in batches, read in order.
        for (id, started) in [("b-2", 2), ("a-1", 1)] {
            store
                .start_execution(&PlanRecord {
                    execution_id: id.into(),
                    plan: serde_json::json!({"plan_id": id}),
                    finished: false,
                    ended: None,
                    started_at_unix_ms: started,
                })
                .unwrap();
        }
        store
            .finish_execution("a-1", Some("superseded by b-2".into()))
            .unwrap();
        let unfinished_ids = |store: &EtcdStore| -> Vec<String> {
            store
                .unfinished_executions()
                .unwrap()
                .into_iter()
                .map(|(id, _)| id)
                .collect()
        };
        assert_eq!(unfinished_ids(&store), vec!["b-2"]);
        assert_eq!(store.executions().unwrap()[0].0, "a-1");
        // An execution written before heads were kept (no `plan-heads/` key) is
        // read whole once, and has a head from then on.
        store
            .put_json(
                "plans/c-0",
                &serde_json::json!({"plan": {}, "finished": false, "started_at_unix_ms": 0}),
            )
            .unwrap();
        assert!(store.get_value("plan-heads/c-0").unwrap().is_none());
        assert_eq!(unfinished_ids(&store), vec!["c-0", "b-2"]);
        assert!(store.get_value("plan-heads/c-0").unwrap().is_some());
        assert_eq!(store.last_execution().unwrap().unwrap().0, "b-2");
        store.finish_execution("c-0", None).unwrap();
        let records: Vec<StepRecord> = (0..250)
            .rev()
            .map(|n| step(n, StepStatus::Started))
            .collect();
        store.journal_many("b-2", &records).unwrap();
        store
            .journal("b-2", &step(7, StepStatus::Succeeded))
            .unwrap();
        let journal = store.journal_of("b-2").unwrap();
        assert_eq!(journal.len(), 250);
        assert!(journal.windows(2).all(|w| w[0].step + 1 == w[1].step));
        assert_eq!(journal[7].status, StepStatus::Succeeded);
        assert!(store.journal_of("a-1").unwrap().is_empty());
        // The audit chain verifies with the controller key and its head is shared.
        for n in 0..3 {
            store.audit("apply", serde_json::json!({"n": n})).unwrap();
        }
        let records = store.audit_records().unwrap();
        let summary =
            reconciler::audit::verify(&records, &identity.public_key()).expect("chain intact");
        assert_eq!(summary.entries, 3);
        assert_eq!(head.get().map(|h| h.seq), Some(3));
        assert_eq!(store.audit_log().unwrap().len(), 3);
        // The newest entries are read from the end, in brief, as the default
        // (whole log) reading gives them.
        let steps: Vec<u32> = (0..120).collect();
        store
            .audit("apply", serde_json::json!({"plan_id": "p", "steps": steps}))
            .unwrap();
        store.audit("sync", serde_json::json!({"n": 4})).unwrap();
        let whole = store.audit_log().unwrap();
        for n in [0, 1, 2, 5, 9] {
            let want: Vec<_> = whole[whole.len().saturating_sub(n)..]
                .iter()
                .cloned()
                .map(reconciler::audit::brief::abbreviate)
                .collect();
            assert_eq!(store.recent_audit(n).unwrap(), want, "newest {n}");
        }
        assert_eq!(
            store.recent_audit(2).unwrap()[0].detail,
            serde_json::json!({"plan_id": "p", "abbreviated": {"steps": 120}})
        );
        // A second opener of the same prefix sees it all; another prefix nothing.
        let other = EtcdStore::open(&etcd.url("t1")).unwrap();
        assert_eq!(other.journal_of("b-2").unwrap().len(), 250);
        assert!(
            EtcdStore::open(&etcd.url("t2"))
                .unwrap()
                .applied()
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_large_value_is_written_as_chunks_and_one_pointer_flip() {
        let Some((etcd, _dir)) = etcd(23792) else {
            return;
        };
        let store = EtcdStore::open(&etcd.url("big")).unwrap();
        // 3.2 MB of plan: more than two etcd requests can carry.
        let big: Vec<String> = (0..100_000).map(|n| format!("step-{n:025}")).collect();
        let record = |plan: serde_json::Value| PlanRecord {
            execution_id: "x-1".into(),
            plan,
            finished: false,
            ended: None,
            started_at_unix_ms: 1,
        };
        store
            .start_execution(&record(serde_json::json!(big)))
            .unwrap();
        let chunks = |store: &EtcdStore| store.range("chunks/plans/x-1/", true).unwrap().len();
        assert_eq!(chunks(&store), 4);
        let read = store.executions().unwrap();
        assert_eq!(read[0].1.plan, serde_json::json!(big));
        // A second large generation replaces the first whole.
        let bigger: Vec<String> = (0..150_000).map(|n| format!("step-{n:025}")).collect();
        store
            .start_execution(&record(serde_json::json!(bigger)))
            .unwrap();
        assert_eq!(chunks(&store), 5);
        assert_eq!(
            store.executions().unwrap()[0].1.plan,
            serde_json::json!(bigger)
        );
        // A small value drops every chunk.
        store.finish_execution("x-1", None).unwrap();
        store
            .start_execution(&record(serde_json::json!(["small"])))
            .unwrap();
        assert_eq!(chunks(&store), 0);
        assert_eq!(
            store.executions().unwrap()[0].1.plan,
            serde_json::json!(["small"])
        );
    }
}
