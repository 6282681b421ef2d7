//! `cairn controller key rotate|revoke|recover`: the controller key's lifecycle.
//! Rotate and revoke are asked of the running controller as a signed action
//! (`controller::keys`), as `cairn controller pause` is: the controller holds the key,
//! the nodes of the applied commit and the audit chain, so it rotates without a
//! restart and without a refused node call. Recover runs here, with the controller
//! stopped, since its key is what was lost (`controller::keys::recover`).
//!
//! Exit codes: 0 finished; 1 not finished because nodes did not take the new set
//! (named, with the reason; run the command again to resume); 2 usage or failure.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// `cairn controller key`.
#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub command: KeyCommand,
}

/// Flags every `cairn controller key` command takes.
#[derive(Debug, clap::Args)]
pub struct KeyFlags {
    /// The controller's data directory (its controller.url and controller.token).
    #[arg(long, value_name = "DIR", default_value = ".cairn")]
    pub data_dir: PathBuf,
    /// The SSH key that signs the action (a private key, or a public key whose
    /// private half ssh-agent holds); it must be a platform key of the controller's
    /// trusted keys. Default: git's user.signingkey.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Output.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub format: String,
}

/// `cairn controller key` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KeyCommand {
    /// Rotate the key the controller signs node requests and the audit log with: a
    /// next key is added on every node of the applied commit, the controller switches
    /// to it (audit entry `controller-key-rotated`), and the old key is retired. Nodes
    /// that do not take a step are named and the command exits 1; run it again to
    /// resume (the old key stays trusted until every node has the new set).
    Rotate(KeyFlags),
    /// Remove a key from the set every node trusts (a recovery key, a key rotated
    /// out that a node still held); the signing key is rotated instead.
    Revoke {
        /// The key, 64 hex characters (`cat DATA_DIR/controller-keys`).
        public_key: String,
        #[command(flatten)]
        flags: KeyFlags,
    },
    /// Replace a lost controller key, authorized by an offline recovery key the
    /// nodes trust (a `HEX recovery` line of DATA_DIR/controller-keys): a new key is
    /// drawn, the audit log hands over to it (`controller-key-recovered`, signed by
    /// the recovery key), and the set without the lost key is pushed to every node,
    /// signed by the recovery key. Run with the controller stopped; nodes that do not
    /// take the set are named and the command exits 1: run it again to resume.
    Recover {
        /// The recovery key's secret (the file `cairn-node` and `cairn controller`
        /// write for their keys: 64 hex characters).
        #[arg(long, value_name = "FILE")]
        recovery_key: PathBuf,
        /// The specs whose nodes get the new set. Default: DATA_DIR/checkout, the
        /// last commit the controller compiled.
        #[arg(long, value_name = "DIR")]
        specs: Option<PathBuf>,
        /// The controller's data directory.
        #[arg(long, value_name = "DIR", default_value = ".cairn")]
        data_dir: PathBuf,
        /// The controllers' state store, when not DATA_DIR/state.redb.
        #[arg(long, value_name = "URL")]
        state: Option<String>,
        /// Output.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
}

/// Runs `cairn controller key …`.
pub fn run(args: KeyArgs) -> anyhow::Result<u8> {
    match args.command {
        KeyCommand::Rotate(flags) => Ok(ask(
            &flags,
            controller::keys::ROTATE_ACTION,
            "/api/v1/controller/key/rotate",
        )),
        KeyCommand::Revoke { public_key, flags } => {
            let key = public_key.trim().to_ascii_lowercase();
            if let Err(e) = proto::auth::parse_public_key(&key) {
                eprintln!(
                    "error: `{public_key}` is not a controller key ({e}); give its 64 hex characters as listed in {}",
                    flags
                        .data_dir
                        .join(controller::enroll::CONTROLLER_KEYS_FILE)
                        .display()
                );
                return Ok(2);
            }
            Ok(ask(
                &flags,
                &controller::keys::revoke_action(&key),
                &format!("/api/v1/controller/key/revoke/{key}"),
            ))
        }
        KeyCommand::Recover {
            recovery_key,
            specs,
            data_dir,
            state,
            format,
        } => recover(recovery_key, specs, data_dir, state.as_deref(), &format),
    }
}

fn recover(
    recovery_key: PathBuf,
    specs: Option<PathBuf>,
    data_dir: PathBuf,
    state: Option<&str>,
    format: &str,
) -> anyhow::Result<u8> {
    if let Some(url) = state.filter(|s| s.starts_with("etcd://")) {
        eprintln!(
            "error: --state {url}: recovering controller replicas on etcd is not built; they hold copies of one controller.key, so copy it from another replica's data directory"
        );
        return Ok(2);
    }
    let recovery = match proto::auth::Identity::load(&recovery_key) {
        Ok(identity) => identity,
        Err(e) => {
            eprintln!("error: the recovery key {}: {e}", recovery_key.display());
            return Ok(2);
        }
    };
    let input = controller::keys::recover::RecoverInput {
        data_dir,
        recovery,
        specs,
        state_file: state.map(PathBuf::from),
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let report = match runtime.block_on(controller::keys::recover::recover(input)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(2);
        }
    };
    if format == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("reports serialize")
        );
    } else {
        print_text(&report);
    }
    Ok(if report.finished() { 0 } else { 1 })
}

fn ask(flags: &KeyFlags, action: &str, path: &str) -> u8 {
    let data_dir: &Path = &flags.data_dir;
    if controller::control::running(data_dir).is_none() {
        eprintln!(
            "error: no cairn controller runs for {}: a key is rotated or revoked by the running controller, which holds the key, the nodes of the applied commit and the audit log; start it (`cairn controller --data-dir {} …`) and run this again",
            data_dir.display(),
            data_dir.display()
        );
        return 2;
    }
    let Some((url, token)) = controller::control::endpoint(data_dir) else {
        eprintln!(
            "error: a controller runs for {} but wrote no {}; is it still starting?",
            data_dir.display(),
            controller::control::url_path(data_dir).display()
        );
        return 2;
    };
    let request = controller::actions::Request {
        action,
        path,
        plan_id: None,
    };
    let answer = match controller::actions::perform(
        &url,
        token.as_deref(),
        request,
        flags.key.as_deref(),
        Duration::from_secs(600),
    ) {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    if answer.status != 200 {
        eprintln!(
            "error: the controller at {url} answered {}: {}",
            answer.status,
            answer.body.trim()
        );
        return 2;
    }
    let report: controller::keys::Report = match serde_json::from_str(&answer.body) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "error: the controller at {url} answered something else than a key report ({e}): {}",
                answer.body.trim()
            );
            return 2;
        }
    };
    if flags.format == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("reports serialize")
        );
    } else {
        print_text(&report);
    }
    if report.finished() { 0 } else { 1 }
}

fn print_text(report: &controller::keys::Report) {
    println!("{}", report.message);
    println!("signing key: {}", report.signing_key);
    println!("keys the nodes are told to trust:");
    for key in &report.keys {
        println!("  {key}");
    }
    if !report.pushed.is_empty() {
        println!("nodes that took the set: {}", report.pushed.join(", "));
    }
    for missed in &report.missed {
        println!(
            "node {} at {} did not take the set: {}",
            missed.node, missed.address, missed.reason
        );
    }
}
