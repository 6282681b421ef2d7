//! `cairn audit verify [DIR] [--state PATH] [--offline]`: proves the audit log
//! is intact (`reconciler::audit`).
//!
//! 1. The chain: every entry's content hash, link hash and signature with the
//!    controller key (`controller.key` next to the state file, else
//!    `DIR/.cairn/controller.key`, else its `controller.pub`), in sequence.
//! 2. The anchors (unless `--offline`): every node of the spec root that
//!    answers is asked for the newest head it saw from this controller key
//!    (`GetInventoryResponse.audit_anchors`); a head beyond the log's end, or
//!    another hash at its seq, means the log's tail was cut or rewritten. A node
//!    that does not answer is listed as not asked; it does not fail the check
//!    (the chain alone still proves everything but a cut tail). A spec root
//!    whose specs do not compile is checked without anchors, with a note.
//!
//! Exit 0 with a summary; 1 naming the first broken entry and what is wrong
//! with it, or the node whose anchor the log does not reach.

use std::path::Path;

use anyhow::Context;
use reconciler::audit::{self, NodeAnchor, VerifyingKey};

use crate::ctx::Ctx;

/// `cairn audit` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Prove the audit log is intact: every entry's hash and signature in
    /// sequence, and the heads the nodes saw (exit 1 naming the first broken entry).
    Verify {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: std::path::PathBuf,
        /// State store file (default: DIR/.cairn/state.redb).
        #[arg(long, value_name = "PATH")]
        state: Option<std::path::PathBuf>,
        /// Do not ask the spec root's nodes for the heads they saw (the chain
        /// alone cannot show that its newest entries were cut off).
        #[arg(long)]
        offline: bool,
    },
}

/// Runs an `audit` subcommand.
pub fn run(command: AuditCommand) -> anyhow::Result<u8> {
    match command {
        AuditCommand::Verify {
            dir,
            state,
            offline,
        } => verify(&dir, state.as_deref(), offline),
    }
}

/// The controller's public key: `controller.key` next to the state file, else
/// in `.cairn/`, else `.cairn/controller.pub`.
fn controller_key(ctx: &Ctx) -> anyhow::Result<VerifyingKey> {
    let beside = ctx.state_path.parent().map(|d| d.join("controller.key"));
    for secret in beside
        .into_iter()
        .chain([ctx.cairn_dir.join("controller.key")])
    {
        if secret.exists() {
            return Ok(proto::auth::Identity::load(&secret)?.public_key());
        }
    }
    let public = ctx.cairn_dir.join("controller.pub");
    let text = std::fs::read_to_string(&public).with_context(|| {
        format!(
            "no controller key to check the audit log with: neither {} nor {} exists",
            ctx.cairn_dir.join("controller.key").display(),
            public.display()
        )
    })?;
    Ok(proto::auth::parse_public_key(text.trim())?)
}

/// The keys of `controller-keys` beside the controller key (none: any recovery key
/// whose signature verifies; the chain must end at the controller key anyway).
fn recovery_keys(ctx: &Ctx) -> anyhow::Result<Vec<VerifyingKey>> {
    let beside = ctx.state_path.parent().map(|d| d.join("controller-keys"));
    for path in beside
        .into_iter()
        .chain([ctx.cairn_dir.join("controller-keys")])
    {
        if path.exists() {
            let keys = proto::auth::TrustedKeys::load(&path)?;
            return keys
                .keys_hex()
                .iter()
                .map(|k| Ok(proto::auth::parse_public_key(k)?))
                .collect();
        }
    }
    Ok(vec![])
}

fn verify(dir: &Path, state: Option<&Path>, offline: bool) -> anyhow::Result<u8> {
    // Controller replicas keep the log in etcd (`--state etcd://HOSTS/PREFIX`).
    let etcd = state
        .and_then(|s| s.to_str())
        .filter(|s| s.starts_with("etcd://"));
    let ctx = Ctx::new(dir, if etcd.is_some() { None } else { state })?;
    if etcd.is_none() && !ctx.state_path.exists() {
        eprintln!(
            "error: there is no state store at {} (nothing was applied from {} yet, or pass --state PATH)",
            ctx.state_path.display(),
            ctx.spec_root.display()
        );
        return Ok(1);
    }
    let key = controller_key(&ctx)?;
    let (where_, records) = match etcd {
        Some(url) => {
            let store = state_etcd::EtcdStore::open(url)?;
            (store.url().to_owned(), store.audit_records()?)
        }
        None => {
            let store = reconciler::state::RedbStore::open(&ctx.state_path)?;
            (ctx.state_path.display().to_string(), store.audit_records()?)
        }
    };
    // The keys nodes are told to trust besides controller.key (an offline recovery
    // key): a recovery after a lost controller.key must be signed by one of them.
    let recovery = recovery_keys(&ctx)?;
    let summary = match audit::verify_with(&records, &key, &recovery) {
        Ok(s) => s,
        Err(broken) => {
            eprintln!(
                "error: the audit log in {where_} is broken at entry {}: {}",
                broken.seq, broken.problem
            );
            return Ok(1);
        }
    };
    println!(
        "audit log {where_}: intact: {} entries{}, head entry {} hash {}, signed by controller key {}",
        summary.entries,
        if summary.unchained > 0 {
            format!(
                " ({} written before the chain started, covered by its first entry)",
                summary.unchained
            )
        } else {
            String::new()
        },
        summary.head_seq,
        if summary.head_hash.is_empty() {
            "-"
        } else {
            &summary.head_hash
        },
        summary.key
    );
    if !summary.previous_keys.is_empty() {
        println!(
            "older entries: signed by {}, each handing over to the next by a key rotation or recovery entry",
            summary.previous_keys.join(", then ")
        );
    }
    if offline {
        println!(
            "anchors: not asked (--offline): the chain cannot show that its newest entries were cut off"
        );
        return Ok(0);
    }
    let Some(nodes) = spec_nodes(&ctx)? else {
        return Ok(0);
    };
    let key_hex = proto::auth::to_hex(key.as_bytes());
    let (anchors, mut notes) = ask_nodes(&ctx, &nodes, &key_hex)?;
    if let Err((_, problem)) = audit::check_anchors(&records, &anchors) {
        eprintln!("error: {problem}");
        return Ok(1);
    }
    let highest = anchors.iter().map(|a| a.seq).max();
    notes.sort();
    println!(
        "anchors: {} of {} nodes answered{}{}",
        nodes.len() - notes.len(),
        nodes.len(),
        match highest {
            Some(seq) => format!("; the highest entry a node saw is {seq}, and the log has it"),
            None => "; none has seen an entry of this log yet".to_owned(),
        },
        if notes.is_empty() {
            String::new()
        } else {
            format!("; not asked: {}", notes.join("; "))
        }
    );
    Ok(0)
}

/// The spec root's nodes; `None` (with a note) when the specs do not compile.
fn spec_nodes(
    ctx: &Ctx,
) -> anyhow::Result<Option<std::collections::BTreeMap<String, reconciler::desired::DesiredNode>>> {
    match crate::frontend::Compiled::load(&ctx.spec_root, None) {
        Ok(c) if !c.compilation.has_errors() => {
            Ok(Some(reconciler::pipeline::spec_nodes(&c.compilation.model)))
        }
        Ok(_) | Err(_) => {
            println!(
                "anchors: not asked: the specs in {} do not compile (`cairn validate`), so their nodes are unknown",
                ctx.spec_root.display()
            );
            Ok(None)
        }
    }
}

/// Each answering node's anchor for `key_hex`; notes on the nodes not asked.
fn ask_nodes(
    ctx: &Ctx,
    nodes: &std::collections::BTreeMap<String, reconciler::desired::DesiredNode>,
    key_hex: &str,
) -> anyhow::Result<(Vec<NodeAnchor>, Vec<String>)> {
    let signer = proto::auth::RequestSigner::new(ctx.identity()?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    Ok(runtime.block_on(async {
        let mut anchors = vec![];
        let mut notes = vec![];
        for node in nodes.values() {
            let answer = async {
                let mut client = reconciler::nodes::connect(&node.address, signer.clone()).await?;
                client
                    .get_inventory()
                    .await
                    .map_err(|s| format!("refused: {}", s.message()))
            };
            match tokio::time::timeout(std::time::Duration::from_secs(5), answer).await {
                Ok(Ok(inventory)) => anchors.extend(
                    inventory
                        .audit_anchors
                        .into_iter()
                        .filter(|a| a.controller_key_hex.eq_ignore_ascii_case(key_hex))
                        .map(|a| NodeAnchor {
                            node: node.name.clone(),
                            seq: a.seq,
                            hash: a.hash_hex,
                        }),
                ),
                Ok(Err(e)) => notes.push(format!("{} ({e})", node.name)),
                Err(_) => notes.push(format!("{} (no answer in 5 s)", node.name)),
            }
        }
        (anchors, notes)
    }))
}
