//! `cairn node token create NODE` and `cairn node keys`: one-time enrollment tokens
//! in the controller's state store, and the node keys enrolled with them
//! (`reconciler::enroll`, `controller::enroll`).
//!
//! The command writes the store itself (the redb file of the data directory, or etcd
//! with replicas), so whoever may run it is whoever may open the controller's state:
//! the same authority as its `controller.key` next to it.

use std::path::Path;

use reconciler::enroll::{EnrollmentStore, TokenRecord};

/// The default lifetime of a token.
pub const DEFAULT_TTL: &str = "15m";

fn with_store<T>(
    data_dir: &Path,
    state: Option<&str>,
    f: impl FnOnce(&dyn EnrollmentStore) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    match state {
        Some(url) if url.starts_with("etcd://") => {
            let store = state_etcd::EtcdStore::open(url)?;
            f(&store)
        }
        Some(path) => f(&reconciler::state::RedbStore::open(Path::new(path))?),
        None => {
            let path = data_dir.join("state.redb");
            if !data_dir.exists() {
                anyhow::bail!(
                    "no controller data directory at {}: pass the controller's --data-dir, or --state etcd://HOSTS/PREFIX for replicas",
                    data_dir.display()
                );
            }
            f(&reconciler::state::RedbStore::open(&path)?)
        }
    }
}

/// `cairn node token create NODE [--ttl 15m]`: prints the token on stdout.
pub fn create(node: &str, ttl: &str, data_dir: &Path, state: Option<&str>) -> anyhow::Result<u8> {
    if let Err(error) = node_name(node) {
        eprintln!("error: {error}");
        return Ok(2);
    }
    let ttl_ms = match compiler::units::parse_duration(ttl) {
        Ok(ms) if ms > 0 => ms,
        Ok(_) => {
            eprintln!("error: --ttl {ttl}: a token must live longer than 0 s");
            return Ok(2);
        }
        Err(e) => {
            eprintln!("error: --ttl {ttl}: {e} (for example `15m` or `1h`)");
            return Ok(2);
        }
    };
    let token = proto::enroll::new_token()?;
    let now = reconciler::state::now_ms();
    let record = TokenRecord {
        node: node.to_owned(),
        created_at_ms: now,
        expires_at_ms: now + ttl_ms,
        created_by: format!(
            "{}@{}",
            std::env::var("USER").unwrap_or_else(|_| "?".into()),
            reconciler::state::hostname()
        ),
        used: None,
    };
    with_store(data_dir, state, |store| {
        store.put_enrollment_token(&proto::enroll::token_hash(&token), &record)?;
        Ok(())
    })?;
    println!("{token}");
    eprintln!(
        "enrollment token for node {node}, good once for {} s: on {node} run `cairn-node --name {node} --enroll TOKEN --controller CONTROLLER_GRPC_ADDR …`",
        ttl_ms / 1000
    );
    Ok(0)
}

/// `cairn node keys`: the enrolled nodes and their keys.
pub fn keys(data_dir: &Path, state: Option<&str>) -> anyhow::Result<u8> {
    let nodes = with_store(data_dir, state, |store| Ok(store.enrolled_nodes()?))?;
    if nodes.is_empty() {
        println!("no node has enrolled");
    }
    for node in nodes {
        println!("{} {} ({})", node.name, node.key_hex, node.how);
    }
    Ok(0)
}

fn node_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a node name (a DNS label: a-z, 0-9 and `-`, at most 63 characters)"
        ))
    }
}
