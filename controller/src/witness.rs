//! `cairn witness`: the site's quorum witness (issues 16 and 22), a small gRPC daemon
//! (`schemas/proto/cairn/node/v1/witness.proto`) that hands out short, exclusive,
//! numbered grants.
//!
//! - One holder per key at a time. `node/NAME`: node NAME holds it while it is cut
//!   off from its controller, to keep its HA VMs running; the controller takes it
//!   (as `controller`) before it declares NAME failed. `vm/NAME`: an FT pair's side.
//! - The holder renews (every ~100 ms); the grant lasts `lease_ms` (capped at
//!   `--max-lease-ms`) from this daemon's answer. Anyone else is refused while it is
//!   live; the first claimant after it lapsed gets it, with `free_ms` saying how long
//!   the key had been free.
//! - Numbers: a new holder gets `counter + 1`, written to `DATA_DIR/grants.json`
//!   (temporary file, fsync, rename, fsync of the directory) BEFORE the answer, so a
//!   restarted witness never gives a number twice or a lower one, and the number can
//!   serve as an epoch. A renewal, or the same holder taking the key again with
//!   nobody in between, keeps its number (nothing is written).
//! - After a restart the in-memory leases are gone, but every holder that could still
//!   hold a live grant is in `grants.json` (written before its answer): for
//!   `--max-lease-ms` from the start the witness grants a key only to the holder it
//!   records (with its number), and refuses anyone else.
//! - Requests are signed (`cairn-req-v2`) for the witness's own key
//!   (`DATA_DIR/identity.key`, made on first start) by a trusted key: a controller
//!   key (`--trusted-controller-keys`, default `DATA_DIR/trusted-controllers`) may
//!   claim any key as `controller`; a node key (`--trusted-node-keys`, default
//!   `DATA_DIR/trusted-nodes`, `HEX NAME` per line) may claim only as its own name,
//!   `node/` keys only of its own name, and `vm/` keys. Both files are re-read
//!   when they change. Nonces are kept in memory (a request replayed after a restart
//!   within the 30 s window can at most renew a grant its signer asked for).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use proto::auth::{Identity, NodeTarget, TrustedKeys, Verifier};
use proto::methods;
use proto::v1;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

/// The longest lease granted unless `--max-lease-ms` says otherwise.
pub const DEFAULT_MAX_LEASE: Duration = Duration::from_millis(2000);

/// What `grants.json` keeps.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Book {
    /// The highest number ever given.
    counter: u64,
    /// Key → its last holder and that holder's number.
    keys: BTreeMap<String, Record>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Record {
    holder: String,
    number: u64,
}

/// A live (or lapsed) grant of this process.
#[derive(Debug, Clone)]
struct Live {
    holder: String,
    number: u64,
    until: Instant,
}

#[derive(Debug)]
struct State {
    book: Book,
    live: BTreeMap<String, Live>,
}

/// A key file re-read when its modification time changes.
#[derive(Debug)]
struct KeyFile {
    path: PathBuf,
    seen: Mutex<(Option<SystemTime>, TrustedKeys)>,
}

impl KeyFile {
    fn new(path: PathBuf) -> KeyFile {
        KeyFile {
            path,
            seen: Mutex::new((None, TrustedKeys::new())),
        }
    }

    fn keys(&self) -> TrustedKeys {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.0 != modified || modified.is_none() {
            let keys = TrustedKeys::load(&self.path).unwrap_or_else(|error| {
                if self.path.exists() {
                    eprintln!("cairn witness: {error}; trusting none of its keys");
                }
                TrustedKeys::new()
            });
            *seen = (modified, keys);
        }
        seen.1.clone()
    }
}

/// The witness: its grants, its book on disk and whom it trusts.
#[derive(Debug)]
pub struct Witness {
    dir: PathBuf,
    state: Mutex<State>,
    started: Instant,
    max_lease: Duration,
    verifier: Verifier,
    controllers: KeyFile,
    nodes: KeyFile,
}

/// How `cairn witness` is started.
#[derive(Debug, Clone)]
pub struct WitnessConfig {
    /// The data directory (identity, `grants.json`, default key files).
    pub data_dir: PathBuf,
    /// Controller keys (default `DATA_DIR/trusted-controllers`).
    pub controller_keys: Option<PathBuf>,
    /// Node keys with their names (default `DATA_DIR/trusted-nodes`).
    pub node_keys: Option<PathBuf>,
    /// The longest lease granted.
    pub max_lease: Duration,
}

impl Witness {
    /// Opens (or makes) the witness's data directory.
    pub fn open(config: &WitnessConfig) -> anyhow::Result<Witness> {
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir).with_context(|| {
            format!("cannot create the witness data directory {}", dir.display())
        })?;
        let identity =
            Identity::load_or_create(&dir.join("identity.key"), &dir.join("identity.pub"))
                .with_context(|| format!("the witness identity in {}", dir.display()))?;
        let path = dir.join("grants.json");
        let book: Book = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is not a witness grant book (it holds the numbers already given; fix or restore it, never delete it: a new book would give lower numbers)",
                    path.display()
                )
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Book::default(),
            Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
        };
        Ok(Witness {
            dir: dir.clone(),
            state: Mutex::new(State {
                book,
                live: BTreeMap::new(),
            }),
            started: Instant::now(),
            max_lease: config.max_lease,
            verifier: Verifier::new(
                proto::auth::DEFAULT_WINDOW,
                NodeTarget::of(proto::witness::NAME, &identity),
            ),
            controllers: KeyFile::new(
                config
                    .controller_keys
                    .clone()
                    .unwrap_or_else(|| dir.join("trusted-controllers")),
            ),
            nodes: KeyFile::new(
                config
                    .node_keys
                    .clone()
                    .unwrap_or_else(|| dir.join("trusted-nodes")),
            ),
        })
    }

    /// The highest number given so far.
    pub fn counter(&self) -> u64 {
        self.lock().book.counter
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the book durably: a temporary file synced, renamed over the old one,
    /// and the directory synced.
    fn persist(&self, book: &Book) -> std::io::Result<()> {
        use std::io::Write as _;
        let path = self.dir.join("grants.json");
        let temporary = self.dir.join("grants.json.tmp");
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(&serde_json::to_vec_pretty(book).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temporary, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Who may do what: `Ok(true)` for a controller key, `Ok(false)` for a node key.
    fn authorize(
        &self,
        verify: impl FnOnce(
            &Verifier,
            &TrustedKeys,
        ) -> Result<proto::auth::Caller, proto::auth::AuthError>,
    ) -> Result<(bool, String), Status> {
        let controllers = self.controllers.keys();
        let mut trusted = controllers.clone();
        trusted.extend(&self.nodes.keys());
        if trusted.is_empty() {
            return Err(Status::unauthenticated(format!(
                "this witness trusts no key yet: write the controller's key to {} and the nodes' keys (HEX NAME per line) to {}",
                self.controllers.path.display(),
                self.nodes.path.display()
            )));
        }
        let caller = verify(&self.verifier, &trusted).map_err(Status::from)?;
        let is_controller = controllers
            .keys_hex()
            .iter()
            .any(|k| k.eq_ignore_ascii_case(&caller.key_hex));
        Ok((is_controller, caller.name))
    }

    /// The answer to a claim, at `now`.
    fn claim_at(
        &self,
        key: &str,
        claimant: &str,
        lease_ms: u64,
        now: Instant,
    ) -> Result<v1::WitnessGrant, Status> {
        let lease = Duration::from_millis(lease_ms.max(1)).min(self.max_lease);
        let lease_ms = lease.as_millis() as u64;
        let mut state = self.lock();
        let answer = |granted: bool,
                      holder: &str,
                      number: u64,
                      until: Instant,
                      free_ms: u64,
                      reason: String| {
            v1::WitnessGrant {
                key: key.to_owned(),
                granted,
                holder: holder.to_owned(),
                number,
                valid_ms: until.saturating_duration_since(now).as_millis() as u64,
                lease_ms,
                free_ms,
                reason,
            }
        };
        if let Some(live) = state.live.get_mut(key)
            && live.until > now
        {
            if live.holder == claimant {
                live.until = now + lease;
                return Ok(answer(
                    true,
                    claimant,
                    live.number,
                    live.until,
                    0,
                    String::new(),
                ));
            }
            let live = live.clone();
            return Ok(answer(
                false,
                &live.holder,
                live.number,
                live.until,
                0,
                format!("`{}` holds it (grant {})", live.holder, live.number),
            ));
        }
        let recovered_at = self.started + self.max_lease;
        let recorded = state.book.keys.get(key).cloned();
        if let Some(record) = &recorded
            && record.holder != claimant
            && now < recovered_at
        {
            return Ok(answer(
                false,
                &record.holder,
                record.number,
                recovered_at,
                0,
                format!(
                    "the witness restarted {} ms ago and `{}` may still hold grant {} from before: nobody else is granted it for the longest lease ({} ms)",
                    now.saturating_duration_since(self.started).as_millis(),
                    record.holder,
                    record.number,
                    self.max_lease.as_millis()
                ),
            ));
        }
        // Free since the last live grant lapsed, or (after a restart) since the
        // longest lease from before it can have run; never held: forever.
        let free_since = match (state.live.get(key), &recorded) {
            (Some(live), _) => Some(live.until.max(recovered_at)),
            (None, Some(_)) => Some(recovered_at),
            (None, None) => None,
        };
        let free_ms = free_since.map_or(u64::MAX, |since| {
            now.saturating_duration_since(since).as_millis() as u64
        });
        let writing = Instant::now();
        let number = match recorded {
            Some(record) if record.holder == claimant => record.number,
            _ => {
                let mut book = state.book.clone();
                book.counter += 1;
                book.keys.insert(
                    key.to_owned(),
                    Record {
                        holder: claimant.to_owned(),
                        number: book.counter,
                    },
                );
                self.persist(&book).map_err(|error| {
                    Status::unavailable(format!(
                        "the witness cannot write {} durably ({error}): no new grant",
                        self.dir.join("grants.json").display()
                    ))
                })?;
                let number = book.counter;
                state.book = book;
                number
            }
        };
        // Each time a key is taken (not renewed while live): who, and how long it had
        // been free, so that a holder that let its grant lapse shows in the log.
        eprintln!(
            "cairn witness: {key} granted to `{claimant}`, number {number}, for {lease_ms} ms ({}; the book took {} ms)",
            if free_ms == u64::MAX {
                "never held before".to_owned()
            } else {
                format!("free for {free_ms} ms")
            },
            writing.elapsed().as_millis()
        );
        let until = now + lease;
        state.live.insert(
            key.to_owned(),
            Live {
                holder: claimant.to_owned(),
                number,
                until,
            },
        );
        Ok(answer(
            true,
            claimant,
            number,
            until,
            free_ms,
            String::new(),
        ))
    }

    fn query_at(&self, key: &str, now: Instant) -> v1::WitnessGrant {
        let state = self.lock();
        let recovered_at = self.started + self.max_lease;
        let (holder, number, until) = match (state.live.get(key), state.book.keys.get(key)) {
            (Some(live), _) if live.until > now => (live.holder.clone(), live.number, live.until),
            (None, Some(record)) if now < recovered_at => {
                (record.holder.clone(), record.number, recovered_at)
            }
            (_, Some(record)) => (String::new(), record.number, now),
            (_, None) => (String::new(), 0, now),
        };
        v1::WitnessGrant {
            key: key.to_owned(),
            granted: false,
            holder,
            number,
            valid_ms: until.saturating_duration_since(now).as_millis() as u64,
            lease_ms: 0,
            free_ms: 0,
            reason: String::new(),
        }
    }
}

/// Whether `caller` may claim `key` as `claimant`.
fn may_claim(is_controller: bool, caller: &str, key: &str, claimant: &str) -> Result<(), Status> {
    let Some((kind, name)) = key.split_once('/') else {
        return Err(Status::invalid_argument(format!(
            "the key `{key}` is neither `node/NAME` nor `vm/NAME`"
        )));
    };
    if !matches!(kind, "node" | "vm") || name.is_empty() {
        return Err(Status::invalid_argument(format!(
            "the key `{key}` is neither `node/NAME` nor `vm/NAME`"
        )));
    }
    if is_controller {
        return if claimant == proto::witness::CONTROLLER || kind == "vm" {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "a controller key claims as `{}`, not `{claimant}`",
                proto::witness::CONTROLLER
            )))
        };
    }
    if claimant != caller {
        return Err(Status::permission_denied(format!(
            "the key of node `{caller}` cannot claim as `{claimant}`"
        )));
    }
    if kind == "node" && name != caller {
        return Err(Status::permission_denied(format!(
            "node `{caller}` may claim only `node/{caller}`, not `{key}`"
        )));
    }
    Ok(())
}

/// The gRPC service over a [`Witness`].
#[derive(Debug, Clone)]
pub struct WitnessService {
    witness: Arc<Witness>,
}

#[tonic::async_trait]
impl v1::witness_server::Witness for WitnessService {
    async fn claim(
        &self,
        request: Request<v1::WitnessClaim>,
    ) -> Result<Response<v1::WitnessGrant>, Status> {
        let (is_controller, caller) = self.witness.authorize(|verifier, trusted| {
            verifier.verify(
                methods::WITNESS_CLAIM,
                &request,
                trusted,
                "controller or node",
            )
        })?;
        let claim = request.into_inner();
        may_claim(is_controller, &caller, &claim.key, &claim.claimant)?;
        let witness = Arc::clone(&self.witness);
        // The book's fsync blocks: off the async threads.
        let answer = tokio::task::spawn_blocking(move || {
            witness.claim_at(&claim.key, &claim.claimant, claim.lease_ms, Instant::now())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(answer))
    }

    async fn query(
        &self,
        request: Request<v1::WitnessQuery>,
    ) -> Result<Response<v1::WitnessGrant>, Status> {
        self.witness.authorize(|verifier, trusted| {
            verifier.verify(
                methods::WITNESS_QUERY,
                &request,
                trusted,
                "controller or node",
            )
        })?;
        let key = request.into_inner().key;
        Ok(Response::new(self.witness.query_at(&key, Instant::now())))
    }
}

/// Serves the witness on `listen` until SIGTERM or SIGINT.
pub async fn serve(listen: std::net::SocketAddr, config: WitnessConfig) -> anyhow::Result<()> {
    let witness = Arc::new(Witness::open(&config)?);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("the witness cannot listen on {listen}"))?;
    println!(
        "cairn witness: listening on {} (data {}, last grant number {}, leases up to {} ms)",
        listener.local_addr()?,
        config.data_dir.display(),
        witness.counter(),
        config.max_lease.as_millis()
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tonic::transport::Server::builder()
        .add_service(v1::witness_server::WitnessServer::new(WitnessService {
            witness,
        }))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            async move {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            },
        )
        .await
        .context("the witness's gRPC server failed")
}

/// `Path` of the witness's public key in its data directory.
pub fn public_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("identity.pub")
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tempdir(tag: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!(
            "cairn-witness-{tag}-{}",
            reconciler::state::random_id()
        ));
        Dir(dir)
    }

    fn witness(dir: &Path, max_lease_ms: u64) -> Witness {
        Witness::open(&WitnessConfig {
            data_dir: dir.to_owned(),
            controller_keys: None,
            node_keys: None,
            max_lease: Duration::from_millis(max_lease_ms),
        })
        .expect("open")
    }

    #[test]
    fn one_holder_at_a_time_and_a_new_holder_gets_a_higher_number() {
        let dir = tempdir("one");
        let w = witness(&dir.0, 1000);
        let t0 = w.started + Duration::from_secs(2);
        let a = w.claim_at("node/a", "a", 300, t0).unwrap();
        assert!(a.granted && a.number == 1 && a.free_ms == u64::MAX, "{a:?}");
        let c = w
            .claim_at("node/a", "controller", 300, t0 + Duration::from_millis(100))
            .unwrap();
        assert!(!c.granted && c.holder == "a" && c.valid_ms == 200, "{c:?}");
        // Renewed by its holder: same number, longer.
        let r = w
            .claim_at("node/a", "a", 300, t0 + Duration::from_millis(200))
            .unwrap();
        assert!(r.granted && r.number == 1 && r.valid_ms == 300, "{r:?}");
        // Lapsed at t0 + 500: the controller gets 2, free for 250 ms.
        let c = w
            .claim_at("node/a", "controller", 300, t0 + Duration::from_millis(750))
            .unwrap();
        assert!(c.granted && c.number == 2 && c.free_ms == 250, "{c:?}");
        let a = w
            .claim_at("node/a", "a", 300, t0 + Duration::from_millis(800))
            .unwrap();
        assert!(!a.granted && a.holder == "controller", "{a:?}");
        // Another key: its own holder, the next number.
        let b = w.claim_at("node/b", "b", 300, t0).unwrap();
        assert_eq!(b.number, 3);
    }

    #[test]
    fn a_restarted_witness_never_gives_a_lower_number_and_honours_the_recorded_holder() {
        let dir = tempdir("restart");
        let w = witness(&dir.0, 1000);
        let t0 = w.started + Duration::from_secs(2);
        assert_eq!(w.claim_at("node/a", "a", 500, t0).unwrap().number, 1);
        assert_eq!(
            w.claim_at("node/a", "controller", 500, t0 + Duration::from_secs(1))
                .unwrap()
                .number,
            2
        );
        drop(w);
        let w = witness(&dir.0, 1000);
        let t0 = w.started;
        // Within the longest lease after the start: only the recorded holder.
        let a = w
            .claim_at("node/a", "a", 500, t0 + Duration::from_millis(10))
            .unwrap();
        assert!(
            !a.granted && a.holder == "controller" && a.number == 2,
            "{a:?}"
        );
        let c = w
            .claim_at("node/a", "controller", 500, t0 + Duration::from_millis(20))
            .unwrap();
        assert!(c.granted && c.number == 2, "{c:?}");
        // Its renewal lapsed, but a grant from before the restart may run until the
        // longest lease after the start: still refused.
        let a = w
            .claim_at("node/a", "a", 500, t0 + Duration::from_millis(600))
            .unwrap();
        assert!(!a.granted && a.holder == "controller", "{a:?}");
        // After that: a new holder, a higher number, free since the recovery ended.
        let a = w
            .claim_at("node/a", "a", 500, t0 + Duration::from_millis(1100))
            .unwrap();
        assert!(a.granted && a.number == 3 && a.free_ms == 100, "{a:?}");
        assert_eq!(
            w.query_at("node/a", t0 + Duration::from_millis(1200))
                .holder,
            "a"
        );
    }

    #[test]
    fn nodes_claim_only_for_themselves() {
        assert!(may_claim(false, "a", "node/a", "a").is_ok());
        assert!(may_claim(false, "a", "node/b", "a").is_err());
        assert!(may_claim(false, "a", "node/a", "controller").is_err());
        assert!(may_claim(true, "cairn-controller", "node/a", "controller").is_ok());
        assert!(may_claim(true, "cairn-controller", "node/a", "a").is_err());
        assert!(may_claim(false, "a", "vm/web-0", "a").is_ok());
        assert!(may_claim(false, "a", "disk/x", "a").is_err());
    }
}
