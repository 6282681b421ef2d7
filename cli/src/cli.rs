//! Argument definitions and dispatch.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::frontend;

/// cairn: a declarative GitOps compiler and reconciler for private clouds.
#[derive(Debug, Parser)]
#[command(name = "cairn", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats of commands that print a model or diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable text.
    Text,
    /// Versioned JSON.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load, parse, resolve, check and expand the specs; print every diagnostic.
    Validate {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Read the specs as they are in this git revision instead of the working tree.
        #[arg(long)]
        rev: Option<String>,
        /// Output format of the diagnostics.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Format every spec file canonically (comments kept).
    Fmt {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// List files that would change and exit 1 instead of writing them.
        #[arg(long)]
        check: bool,
    },
    /// Print the compiled model.
    Compile {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Read the specs as they are in this git revision.
        #[arg(long)]
        rev: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Place every VM and volume; explain, what-if and rebalance.
    Place {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// A previous placement (the JSON `place --format json` printed): VMs stay where they are.
        #[arg(long)]
        previous: Option<PathBuf>,
        /// Rank the candidate nodes for one VM, with the parts of each score.
        #[arg(long, value_name = "VM")]
        explain: Option<String>,
        /// What if these failed: node=NAME, rack=NAME or site=NAME (repeatable).
        #[arg(long, value_name = "KIND=NAME")]
        fail: Vec<String>,
        /// Move VMs toward the strategy's optimum within max-moves and max-unavailable.
        #[arg(long)]
        rebalance: bool,
        /// With --rebalance: the fewest moves that free whole nodes; says how many.
        #[arg(long, requires = "rebalance")]
        consolidate: bool,
        /// With --rebalance: weigh VMs by their measured load, a JSON file
        /// `{"vms": {"db": {"cpu_cores": 1.5, "resident_bytes": 2147483648}}}` (VMs
        /// left out count their declared size); moves still fit by declared size.
        #[arg(
            long,
            value_name = "FILE",
            requires = "rebalance",
            conflicts_with = "consolidate"
        )]
        usage: Option<PathBuf>,
        /// With --rebalance: weigh VMs by the load the controller measured (its
        /// `GET /api/v1/usage`, the nodes' last answers); VMs it has no rate for count
        /// their declared size.
        #[arg(
            long,
            requires = "rebalance",
            conflicts_with_all = ["consolidate", "usage"]
        )]
        measured: bool,
        /// With --measured: the controller (`http://HOST:PORT`; token from
        /// DIR/.cairn/controller.token or CAIRN_CONTROLLER_TOKEN); without it, the
        /// controller that runs for DIR/.cairn.
        #[arg(long, value_name = "URL", requires = "measured")]
        controller: Option<String>,
        /// Exact search for pack sites (work-limited); reports the gap to the proven bound.
        #[arg(long)]
        optimize: bool,
    },
    /// Print the dependency graph and its waves.
    Graph {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "dot")]
        format: crate::placecmd::GraphFormat,
    },
    /// Compare the specs with what the node runtimes report and print the ordered actions.
    Plan {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Write the plan, signed and bound to the observed state, to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Output format (JSON: versioned, see reconciler/ARCHITECTURE-section.md).
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// Exit 0 when there is nothing to do and 3 when there are changes.
        #[arg(long)]
        detailed_exitcode: bool,
        /// One line per change, no details and no wave list.
        #[arg(long)]
        concise: bool,
        /// Plan against a recorded observation (JSON, the `observed` object of a plan
        /// file) instead of asking the nodes; uses no state store (offline review, tests).
        #[arg(long, value_name = "FILE", conflicts_with = "out")]
        observed: Option<PathBuf>,
        /// Move running VMs cold (stop, delete, create, start on the new node) instead
        /// of live: without it, moving a running VM is one `migrate_vm` step (a live
        /// migration; it runs on its old node until the commit).
        #[arg(long)]
        cold: bool,
        /// State store file (default: DIR/.cairn/state.redb).
        #[arg(long, value_name = "PATH")]
        state: Option<PathBuf>,
    },
    /// Carry out a plan: the current one for a spec root, or a saved plan file.
    Apply {
        /// Spec root or a plan file written by `cairn plan --out`.
        #[arg(default_value = ".")]
        target: PathBuf,
        /// Do not ask for confirmation.
        #[arg(long)]
        auto_approve: bool,
        /// Node actions in flight at once.
        #[arg(long, default_value_t = 8)]
        parallelism: usize,
        /// Move running VMs cold (stop, delete, create, start on the new node) instead
        /// of live: without it, moving a running VM is one `migrate_vm` step (a live
        /// migration; it runs on its old node until the commit). A plan file keeps
        /// the steps it was made with.
        #[arg(long)]
        cold: bool,
        /// State store file (default: DIR/.cairn/state.redb).
        #[arg(long, value_name = "PATH")]
        state: Option<PathBuf>,
    },
    /// What runs where, health and drift.
    Status {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// State store file (default: DIR/.cairn/state.redb).
        #[arg(long, value_name = "PATH")]
        state: Option<PathBuf>,
        /// Ask this controller (`http://HOST:PORT`) for its last sync; without it, the
        /// controller that runs for DIR/.cairn (its controller.url) is asked.
        #[arg(long, value_name = "URL")]
        controller: Option<String>,
        /// Show the status of a recorded observation (JSON, the `observed` object of a
        /// plan file) instead of asking the nodes: no controller, no state store.
        #[arg(long, value_name = "FILE", conflicts_with = "controller")]
        observed: Option<PathBuf>,
    },
    /// Start a lost site's protected VMs at their plan's `to-site`. Only `--drill` is
    /// built: every VM of SITE replicated to another site boots from its newest
    /// replicated snapshot there, without NICs, and is removed again; SITE is not
    /// touched. Audited.
    Failover {
        /// The site.
        #[arg(long)]
        site: String,
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// A restore drill: boot, check running and healthy, remove.
        #[arg(long)]
        drill: bool,
        /// How long a drill VM may take to run and be healthy.
        #[arg(long, default_value = "60s")]
        limit: String,
        /// State store file (default: DIR/.cairn/state.redb).
        #[arg(long, value_name = "PATH")]
        state: Option<PathBuf>,
    },
    /// Bring a failed-over site's VMs back: ship the DR site's changes to it as a
    /// delta from the common snapshot, then start them there.
    Failback {
        /// The site that failed over.
        #[arg(long)]
        site: String,
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// How long a VM may take to run and be healthy again.
        #[arg(long, default_value = "60s")]
        limit: String,
        /// State store file (default: DIR/.cairn/state.redb).
        #[arg(long, value_name = "PATH")]
        state: Option<PathBuf>,
    },
    /// Volumes of VMs: export one to local NBD clients, list its snapshots, restore it.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// VMs: reboot one, attach to its serial console (through the controller), or
    /// drive the built-in guest's disk I/O (`disk-io`).
    Vm {
        #[command(subcommand)]
        command: crate::vmcmd::VmCommand,
    },
    /// The local dev cluster: one cairn-node per node of the spec.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// The audit log: `verify` proves it intact (hash chain, signatures, node anchors).
    Audit {
        #[command(subcommand)]
        command: crate::audit::AuditCommand,
    },
    /// Remove the apply lock of a dead `cairn apply` (its id is in the lock error).
    ForceUnlock {
        /// The lock id.
        id: String,
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// State store file (default: DIR/.cairn/state.redb).
        #[arg(long, value_name = "PATH")]
        state: Option<PathBuf>,
        /// Remove the lock even when its holder may still be running.
        #[arg(long)]
        force: bool,
    },
    /// Write the JSON Schemas of the spec language, the compiled model and every JSON output.
    Schema {
        /// Directory to write into.
        #[arg(long, default_value = "schemas")]
        out: PathBuf,
    },
    /// Write a synthetic spec repository (for benchmarks and scale tests).
    Gen {
        /// Directory to create (must be empty or absent).
        #[arg(long)]
        out: PathBuf,
        /// Physical nodes.
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        /// VMs (after group expansion).
        #[arg(long, default_value_t = 1000)]
        vms: usize,
        /// Seed of the pseudo-random choices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Address the nodes for a simulated cluster: node n{i} at this IP and port + i,
        /// what `cairn-node --simulate NODES --listen ADDR` serves.
        #[arg(long, value_name = "IP:PORT")]
        simulate: Option<std::net::SocketAddr>,
    },
    /// Measure the compiler on generated repositories and print medians.
    Bench {
        /// Physical nodes.
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// VMs.
        #[arg(long, default_value_t = 10_000)]
        vms: usize,
        /// Runs per measurement.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Run the policies (policies/*.rego) against the model, placement and plan.
    Check(crate::policy_cmd::CheckArgs),
    /// Policy tools: unit tests, benchmark.
    Policy {
        #[command(subcommand)]
        command: crate::policy_cmd::PolicyCommand,
    },
    /// Preview what a change between two git revisions would do (for pull requests).
    Diff(crate::diff::DiffArgs),
    /// Verify a commit's SSH signature against trusted keys (git's allowed-signers format).
    VerifyCommit(crate::verify::VerifyArgs),
    /// The GitOps controller: follow a branch of a spec repository and keep the
    /// cluster matching its head (`pause`, `resume`, `bench` below).
    Controller(Box<ControllerArgs>),
    /// The quorum witness of a site (`witness address=` in the spec): short,
    /// exclusive, numbered grants that decide which side of a partition keeps an HA
    /// node's VMs (and, later, which side of an FT pair runs).
    Witness {
        /// Where to listen (`host:port`, the site's `witness address=`).
        #[arg(long, value_name = "ADDR")]
        listen: std::net::SocketAddr,
        /// Its data directory: its identity and the grant numbers it gave (kept
        /// durably; never delete it, a new one would give lower numbers).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Controller keys (`HEX NAME` per line). Default: DATA_DIR/trusted-controllers.
        #[arg(long, value_name = "FILE")]
        trusted_controller_keys: Option<PathBuf>,
        /// Node keys, each with its node's name (`HEX NAME` per line). Default:
        /// DATA_DIR/trusted-nodes.
        #[arg(long, value_name = "FILE")]
        trusted_node_keys: Option<PathBuf>,
        /// The longest lease it grants, ms; after a restart it grants nobody new for
        /// that long.
        #[arg(long, value_name = "MS", default_value_t = 2000)]
        max_lease_ms: u64,
    },
    /// Node operations through the controller (`maintenance`).
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Ask the controller to sync the branch head now, or approve a held plan.
    Sync {
        /// The controller (`http://HOST:PORT`; token from DATA_DIR/controller.token or
        /// CAIRN_CONTROLLER_TOKEN); without it, the controller that runs for DATA_DIR.
        #[arg(long, value_name = "URL")]
        controller: Option<String>,
        /// The controller's data directory.
        #[arg(long, value_name = "DIR", default_value = ".cairn")]
        data_dir: PathBuf,
        /// Carry out this held plan (`GET /api/v1/plans`, the `held` event): only if
        /// the branch head still plans to exactly this plan.
        #[arg(long, value_name = "PLAN_ID")]
        approve: Option<String>,
        /// The SSH key that signs the action (a private key, or a public key
        /// whose private half ssh-agent holds); it must be a platform key of the
        /// controller's trusted keys. Default: git's user.signingkey.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
    },
}

/// The controller a signed action is asked of, and the key that signs it.
#[derive(Debug, clap::Args)]
pub struct ActionFlags {
    /// The controller (`http://HOST:PORT`; token from DATA_DIR/controller.token or
    /// CAIRN_CONTROLLER_TOKEN); without it, the controller that runs for DATA_DIR.
    #[arg(long, value_name = "URL")]
    pub controller: Option<String>,
    /// The controller's data directory.
    #[arg(long, value_name = "DIR", default_value = ".cairn")]
    pub data_dir: PathBuf,
    /// The SSH key that signs the action (a private key, or a public key whose
    /// private half ssh-agent holds); it must be a platform key of the controller's
    /// trusted keys. Default: git's user.signingkey.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

/// `cairn node` subcommands.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Put a node in maintenance (no VM is placed on it any more: new VMs, HA
    /// restarts and crash moves go elsewhere; its volume copies are moved live to
    /// other nodes; its VMs migrate live to other nodes (with NICs where both nodes
    /// report a migration address), at
    /// most the site's max-moves and each group's max-unavailable at a time, in the
    /// order the plan shows; the others stay and are named) or take it out.
    Maintenance {
        /// The node (as the applied commit names it).
        node: String,
        /// Enter maintenance.
        #[arg(long, conflicts_with = "off", required_unless_present = "off")]
        on: bool,
        /// Leave maintenance.
        #[arg(long)]
        off: bool,
        #[command(flatten)]
        to: ActionFlags,
    },
    /// One-time enrollment tokens: a new node presents one (`cairn-node --enroll
    /// TOKEN --controller ADDR`) to be trusted, instead of copied key files.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Revoke a node's key (asked of the running controller as a signed action): its
    /// lease renewals are refused from then on, so its HA VMs are fenced and
    /// restarted elsewhere once it is detected failed, and it enrolls again only with
    /// a new key and a new token.
    Revoke {
        /// The node.
        node: String,
        #[command(flatten)]
        to: ActionFlags,
    },
    /// The nodes that enrolled and the keys the controller pinned for them.
    Keys {
        /// The controller's data directory (its state.redb).
        #[arg(long, value_name = "DIR", default_value = ".cairn")]
        data_dir: PathBuf,
        /// The controllers' state store (`etcd://HOSTS/PREFIX` with replicas, or a
        /// redb file); default DATA_DIR/state.redb.
        #[arg(long, value_name = "PATH|etcd://HOSTS/PREFIX")]
        state: Option<String>,
    },
}

/// `cairn node token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a one-time token that enrolls NODE (printed on stdout; the store keeps
    /// only its SHA-256). Good once, until it expires.
    Create {
        /// The node it enrolls (the name the node starts with).
        node: String,
        /// How long it is accepted.
        #[arg(long, value_name = "DURATION", default_value = crate::tokens::DEFAULT_TTL)]
        ttl: String,
        /// The controller's data directory (its state.redb).
        #[arg(long, value_name = "DIR", default_value = ".cairn")]
        data_dir: PathBuf,
        /// The controllers' state store (`etcd://HOSTS/PREFIX` with replicas, or a
        /// redb file); default DATA_DIR/state.redb.
        #[arg(long, value_name = "PATH|etcd://HOSTS/PREFIX")]
        state: Option<String>,
    },
}

/// `cairn controller`: runs the daemon, or one of its subcommands.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ControllerArgs {
    #[command(subcommand)]
    pub command: Option<ControllerCommand>,
    #[command(flatten)]
    pub run: ControllerRunArgs,
}

/// Flags of the controller daemon.
#[derive(Debug, clap::Args)]
pub struct ControllerRunArgs {
    /// The spec repository: a local path, bare or not (operators push to it),
    /// or a remote fetched into DATA_DIR/mirror.git: https://HOST/PATH,
    /// ssh://[USER@]HOST[:PORT]/PATH or USER@HOST:PATH.
    #[arg(long, value_name = "PATH|URL")]
    pub repo: Option<PathBuf>,
    /// The branch followed.
    #[arg(long, default_value = "main")]
    pub branch: String,
    /// The spec root inside the repository (default: its top).
    #[arg(long, value_name = "SUBDIR")]
    pub path: Option<PathBuf>,
    /// Holds controller.key (the key the nodes trust), the state store, the event
    /// log and the API token (`cairn dev up DIR` makes DIR/.cairn).
    #[arg(long, value_name = "DIR", default_value = ".cairn")]
    pub data_dir: PathBuf,
    /// Keys that may sign commits, in git's allowed-signers format (default:
    /// DATA_DIR/allowed-signers).
    #[arg(long, value_name = "FILE")]
    pub trusted_keys: Option<PathBuf>,
    /// State store: a redb file (default: DATA_DIR/state.redb), or
    /// etcd://HOST:PORT[,HOST:PORT…]/PREFIX shared by controller replicas, one of which
    /// leads (elected through an etcd lease; the others serve the read-only API).
    #[arg(long, value_name = "PATH|etcd://HOSTS/PREFIX")]
    pub state: Option<PathBuf>,
    /// Address of the HTTP interface (health, metrics, status, events).
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub listen: std::net::SocketAddr,
    /// Address of the standard gRPC health service (grpc.health.v1: SERVING
    /// while ready), or `none`.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7401")]
    pub grpc_listen: String,
    /// How often the branch is read even without a change notice.
    #[arg(long, default_value = "60s")]
    pub poll: String,
    /// How often every node is observed and drift planned.
    #[arg(long, default_value = "30s")]
    pub drift_interval: String,
    /// Report drift without repairing it.
    #[arg(long)]
    pub no_self_heal: bool,
    /// Node actions in flight at once over every node (at most 8 on one node).
    #[arg(long, default_value_t = 1024)]
    pub parallelism: usize,
    /// Turns on POST /api/v1/webhook (GitHub, GitLab, Gitea, Forgejo push
    /// events): the file holds the secret given to the forge's webhook.
    #[arg(long, value_name = "FILE")]
    pub webhook_secret: Option<PathBuf>,
    /// https remotes: a file of `USER:TOKEN` (or the token alone), read at each
    /// fetch (else $CAIRN_GIT_TOKEN, user $CAIRN_GIT_USERNAME).
    #[arg(long, value_name = "FILE")]
    pub git_credentials: Option<PathBuf>,
    /// https remotes: more certificate authorities (PEM), on top of the system's.
    #[arg(long, value_name = "FILE")]
    pub git_ca: Option<PathBuf>,
    /// ssh remotes: the private key (its passphrase in $CAIRN_SSH_KEY_PASSPHRASE).
    #[arg(long, value_name = "FILE")]
    pub ssh_key: Option<PathBuf>,
    /// ssh remotes: the server's host key must be in this file (OpenSSH's
    /// format; default DATA_DIR/known_hosts).
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Notification receivers (KDL: `receiver "NAME" { format "json"|"slack"; url
    /// "http://…"; events "sync:failed" …; secret-file FILE }`); default
    /// DATA_DIR/notify.kdl when it exists.
    #[arg(long, value_name = "FILE")]
    pub notify: Option<PathBuf>,
}

/// `cairn controller` subcommands.
#[derive(Debug, Subcommand)]
pub enum ControllerCommand {
    /// Hand the cluster to manual `cairn apply`: the controller applies nothing
    /// automatically until `resume` (it waits for a sync in progress first).
    Pause {
        /// The controller's data directory.
        #[arg(long, value_name = "DIR", default_value = ".cairn")]
        data_dir: PathBuf,
        /// The SSH key that signs the action (a private key, or a public key
        /// whose private half ssh-agent holds); it must be a platform key of the
        /// controller's trusted keys. Default: git's user.signingkey.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
    },
    /// Hand the cluster back to the controller.
    Resume {
        /// The controller's data directory.
        #[arg(long, value_name = "DIR", default_value = ".cairn")]
        data_dir: PathBuf,
        /// The SSH key that signs the action (as for `pause`).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
    },
    /// Rotate the controller key, or revoke a key of the set nodes trust (asked of
    /// the running controller as a signed action).
    Key(crate::keys::KeyArgs),
    /// Measure push → sync started and push → converged on a dev cluster of the
    /// quickstart's shape, and print medians per phase.
    Bench(controller::bench::BenchArgs),
    /// Write the control plane's state in etcd (placement, plans, journal, epochs,
    /// audit, events) to FILE, read at one revision; the election, the apply lock
    /// and node lease grants are left out.
    Backup {
        /// The controllers' state store.
        #[arg(long, value_name = "etcd://HOSTS/PREFIX")]
        state: String,
        /// The backup file (JSON lines; written whole or not at all).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Restore a backup into an empty etcd prefix (another etcd, or another prefix),
    /// or finish a restore of the same file that was cut off. Controllers started on
    /// it get fencing tokens above every token of the backed-up cluster.
    Restore {
        /// The empty state store to restore into.
        #[arg(long, value_name = "etcd://HOSTS/PREFIX")]
        state: String,
        /// The backup file (`cairn controller backup`).
        file: PathBuf,
    },
}

fn duration_flag(flag: &str, text: &str) -> anyhow::Result<std::time::Duration> {
    compiler::units::parse_duration(text)
        .map(std::time::Duration::from_millis)
        .map_err(|e| anyhow::anyhow!("--{flag} {text}: {e} (for example `30s` or `2m`)"))
}

fn controller_cmd(args: ControllerArgs) -> anyhow::Result<u8> {
    match args.command {
        Some(ControllerCommand::Pause { data_dir, key }) => Ok(
            controller::control::pause_or_resume(&data_dir, true, key.as_deref()),
        ),
        Some(ControllerCommand::Resume { data_dir, key }) => Ok(
            controller::control::pause_or_resume(&data_dir, false, key.as_deref()),
        ),
        Some(ControllerCommand::Key(k)) => crate::keys::run(k),
        Some(ControllerCommand::Bench(b)) => controller::bench::run(b),
        Some(ControllerCommand::Backup { state, out }) => crate::statebackup::backup(&state, &out),
        Some(ControllerCommand::Restore { state, file }) => {
            crate::statebackup::restore(&state, &file)
        }
        None => {
            let run = args.run;
            let Some(repo) = run.repo else {
                eprintln!(
                    "error: `cairn controller` needs --repo PATH|URL (the spec repository to follow)"
                );
                return Ok(2);
            };
            let remote = repo
                .to_str()
                .filter(|r| controller::remote::is_remote(r))
                .map(|url| controller::remote::Remote {
                    url: url.to_owned(),
                    git_credentials: run.git_credentials,
                    ssh_key: run.ssh_key,
                    known_hosts: run.known_hosts,
                    ca: run.git_ca,
                });
            controller::run(controller::Config {
                repo,
                branch: run.branch,
                subdir: run.path.unwrap_or_default(),
                data_dir: run.data_dir,
                trusted_keys: run.trusted_keys,
                state: run.state,
                listen: run.listen,
                grpc_listen: match run.grpc_listen.as_str() {
                    "none" | "off" => None,
                    a => Some(a.parse().map_err(|e| {
                        anyhow::anyhow!(
                            "--grpc-listen {a}: {e} (an address such as 127.0.0.1:7401, or `none`)"
                        )
                    })?),
                },
                poll: duration_flag("poll", &run.poll)?,
                drift_interval: duration_flag("drift-interval", &run.drift_interval)?,
                self_heal: !run.no_self_heal,
                parallelism: run.parallelism.max(1),
                remote,
                webhook_secret: run.webhook_secret,
                notify: run.notify,
            })
        }
    }
}

/// `cairn status`, with the controller's last sync when one manages the spec root.
fn status_cmd(
    dir: &std::path::Path,
    state: Option<&std::path::Path>,
    format: Format,
    controller: Option<&str>,
) -> anyhow::Result<u8> {
    let data_dir = dir.join(".cairn");
    let Some((url, token)) = controller::control::status_endpoint(&data_dir, controller) else {
        return crate::commands::status_cmd(dir, state, format);
    };
    match controller::control::fetch_status(&url, token.as_deref()) {
        Ok(json) if format == Format::Json => {
            println!("{}", serde_json::to_string_pretty(&json)?);
            Ok(0)
        }
        Ok(json) => {
            // The controller judges the cluster against the commit it applied, not
            // against the files in DIR (which may be older or newer than the branch).
            let code = match serde_json::from_value::<reconciler::status::Status>(json.clone()) {
                Ok(status) => {
                    print!("{}", reconciler::status::text(&status));
                    0
                }
                Err(e) => {
                    eprintln!(
                        "note: the controller's status is not in a shape this cairn reads ({e}); showing DIR's specs against the nodes"
                    );
                    crate::commands::status_cmd(dir, state, format)?
                }
            };
            print!("{}", controller::control::status_text(&json, &url));
            Ok(code)
        }
        Err(e) => {
            eprintln!("note: {e}; showing what the nodes say without the controller");
            crate::commands::status_cmd(dir, state, format)
        }
    }
}

/// `cairn dev` subcommands.
#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Start one cairn-node per node of the spec on its address; wait until all answer.
    #[command(group(clap::ArgGroup::new("controller").args(["controller_repo", "gitops"])))]
    Up {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Also start a GitOps controller following this repository (bare or not),
        /// with DIR/.cairn as its data directory; `dev down` stops it.
        #[arg(long, value_name = "REPO")]
        controller_repo: Option<PathBuf>,
        /// Also make a bare repository seeded with DIR's specs, a working clone
        /// that signs commits with a new dev key (trusted as a platform key), and
        /// start a controller following it: then edit, commit and `git push`.
        /// Everything is under DIR/.cairn/dev/gitops/ and kept across runs.
        #[arg(long)]
        gitops: bool,
        /// The controller's trusted keys (default: DIR/.cairn/allowed-signers).
        #[arg(long, value_name = "FILE", requires = "controller_repo")]
        trusted_keys: Option<PathBuf>,
        /// The controller's HTTP address.
        #[arg(long, default_value = "127.0.0.1:7400", requires = "controller")]
        controller_listen: String,
        /// The controller's gRPC address (health, and the leases the nodes renew
        /// there: they fence their HA VMs when they lose quorum).
        #[arg(long, default_value = "127.0.0.1:7401", requires = "controller")]
        controller_grpc_listen: String,
        /// Serve every node from one simulated `cairn-node --simulate` process (no
        /// VMs, no network changes; scale and fault tests) instead of one real node each.
        #[arg(long)]
        simulate: bool,
    },
    /// Stop the dev nodes (and their VMs) of a spec root.
    Down {
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
}

/// `cairn volume …`.
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Export a VM disk's volume over NBD to local clients on the node holding its
    /// primary copy: an owner-only unix socket that closes after its lifetime.
    /// Prints the `nbd+unix://` URI.
    Export {
        /// `VM/DISK`.
        target: String,
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// How long the export stays open (`30m`, `2h`; `0s` = until unexported).
        #[arg(long, default_value = "1h")]
        lifetime: String,
        /// State store file (default: DIR/.cairn/state.redb).
        #[arg(long, value_name = "PATH")]
        state: Option<PathBuf>,
    },
    /// List a VM disk's snapshots per site (oldest first): when each was taken, its
    /// size, the bytes only it holds (what deleting it frees) and the copies holding it.
    Snapshots {
        /// `VM/DISK`.
        target: String,
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// State store file (default: DIR/.cairn/state.redb).
        #[arg(long, value_name = "PATH")]
        state: Option<PathBuf>,
    },
    /// Restore a VM disk from one of its snapshots: in place (the VM must be stopped;
    /// refused while it runs) or into a new volume (`--as NAME`; `VM/DISK` names that
    /// disk's volume). Audited.
    Restore {
        /// `VM/DISK`.
        target: String,
        /// Spec root (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// The snapshot (`cairn volume snapshots VM/DISK` lists them).
        #[arg(long, value_name = "ID")]
        snapshot: String,
        /// Restore into this new volume instead of in place.
        #[arg(long = "as", value_name = "NAME")]
        into: Option<String>,
        /// State store file (default: DIR/.cairn/state.redb).
        #[arg(long, value_name = "PATH")]
        state: Option<PathBuf>,
    },
}

/// Runs a command; returns the exit code.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Validate { dir, rev, format } => frontend::validate(&dir, rev.as_deref(), format),
        Command::Fmt { dir, check } => frontend::fmt(&dir, check),
        Command::Compile { dir, rev, format } => frontend::compile(&dir, rev.as_deref(), format),
        Command::Place {
            dir,
            format,
            previous,
            explain,
            fail,
            rebalance,
            consolidate,
            usage,
            measured,
            controller,
            optimize,
        } => crate::placecmd::place(&crate::placecmd::PlaceArgs {
            dir,
            format,
            previous,
            explain,
            fail,
            rebalance,
            consolidate,
            usage,
            measured: measured.then_some(controller),
            optimize,
        }),
        Command::Graph { dir, format } => crate::placecmd::graph(&dir, format),
        Command::Plan {
            dir,
            out,
            format,
            detailed_exitcode,
            concise,
            observed,
            cold,
            state,
        } => crate::commands::plan_cmd(crate::commands::PlanArgs {
            dir,
            state,
            out,
            format,
            detailed_exitcode,
            concise,
            observed,
            cold,
        }),
        Command::Apply {
            target,
            auto_approve,
            parallelism,
            cold,
            state,
        } => {
            if let Some(why) = controller::control::manual_apply_refusal(
                &controller::control::apply_data_dir(&target),
            ) {
                eprintln!("error: {why}");
                return Ok(1);
            }
            crate::commands::apply_cmd(crate::commands::ApplyArgs {
                target,
                state,
                auto_approve,
                parallelism,
                cold,
            })
        }
        Command::Status {
            dir,
            format,
            state,
            controller: _,
            observed: Some(observed),
        } => crate::commands::status_observed(&dir, state.as_deref(), format, &observed),
        Command::Status {
            dir,
            format,
            state,
            controller,
            observed: None,
        } => status_cmd(&dir, state.as_deref(), format, controller.as_deref()),
        Command::Failover {
            site,
            dir,
            drill,
            limit,
            state,
        } => match compiler::units::parse_duration(&limit) {
            Ok(ms) => crate::failover::failover(
                &dir,
                state.as_deref(),
                &site,
                drill,
                std::time::Duration::from_millis(ms),
            ),
            Err(e) => {
                eprintln!("error: --limit {limit}: {e} (for example `60s`)");
                Ok(2)
            }
        },
        Command::Failback {
            site,
            dir,
            limit,
            state,
        } => match compiler::units::parse_duration(&limit) {
            Ok(ms) => crate::failover::failback(
                &dir,
                state.as_deref(),
                &site,
                std::time::Duration::from_millis(ms),
            ),
            Err(e) => {
                eprintln!("error: --limit {limit}: {e} (for example `60s`)");
                Ok(2)
            }
        },
        Command::Volume { command } => match command {
            VolumeCommand::Export {
                target,
                dir,
                lifetime,
                state,
            } => crate::commands::volume_export(&dir, state.as_deref(), &target, &lifetime),
            VolumeCommand::Snapshots {
                target,
                dir,
                format,
                state,
            } => crate::volumecmd::snapshots(&dir, state.as_deref(), &target, format),
            VolumeCommand::Restore {
                target,
                dir,
                snapshot,
                into,
                state,
            } => crate::volumecmd::restore(
                &dir,
                state.as_deref(),
                &crate::volumecmd::RestoreArgs {
                    target: &target,
                    snapshot: &snapshot,
                    into: into.as_deref(),
                },
            ),
        },
        Command::Vm { command } => crate::vmcmd::run(command),
        Command::Dev { command } => match command {
            DevCommand::Up {
                dir,
                controller_repo,
                gitops,
                trusted_keys,
                controller_listen,
                controller_grpc_listen,
                simulate,
            } => {
                let with_controller = gitops || controller_repo.is_some();
                let lease_from = with_controller.then_some(controller_grpc_listen.as_str());
                let code = if simulate {
                    crate::simulate::dev_up(&dir, lease_from)?
                } else {
                    crate::commands::dev_up(&dir, lease_from)?
                };
                if code != 0 {
                    return Ok(code);
                }
                let ctx = crate::ctx::Ctx::new(&dir, None)?;
                if gitops {
                    let paths = crate::gitops::prepare(&ctx)?;
                    let code = crate::dev::start_controller(
                        &ctx,
                        &paths.bare,
                        Some(&paths.allowed_signers),
                        &controller_listen,
                        &controller_grpc_listen,
                    )?;
                    if code == 0 {
                        print!(
                            "{}",
                            crate::gitops::next_steps(&ctx, &paths, &controller_listen)
                        );
                    }
                    return Ok(code);
                }
                match controller_repo {
                    Some(repo) => crate::dev::start_controller(
                        &ctx,
                        &repo,
                        trusted_keys.as_deref(),
                        &controller_listen,
                        &controller_grpc_listen,
                    ),
                    None => Ok(code),
                }
            }
            DevCommand::Down { dir } => crate::commands::dev_down(&dir),
        },
        Command::Audit { command } => crate::audit::run(command),
        Command::ForceUnlock {
            id,
            dir,
            state,
            force,
        } => crate::commands::force_unlock(&dir, state.as_deref(), &id, force),
        Command::Schema { out } => frontend::schema(&out),
        Command::Gen {
            out,
            nodes,
            vms,
            seed,
            simulate,
        } => frontend::generate(&out, nodes, vms, seed, simulate),
        Command::Bench { nodes, vms, runs } => frontend::bench(nodes, vms, runs),
        Command::Check(args) => crate::policy_cmd::check(args),
        Command::Policy { command } => crate::policy_cmd::policy(command),
        Command::Diff(args) => crate::diff::run(args),
        Command::VerifyCommit(args) => crate::verify::run(args),
        Command::Controller(args) => controller_cmd(*args),
        Command::Witness {
            listen,
            data_dir,
            trusted_controller_keys,
            trusted_node_keys,
            max_lease_ms,
        } => {
            let config = controller::witness::WitnessConfig {
                data_dir,
                controller_keys: trusted_controller_keys,
                node_keys: trusted_node_keys,
                max_lease: std::time::Duration::from_millis(max_lease_ms.max(1)),
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(controller::witness::serve(listen, config))?;
            Ok(0)
        }
        Command::Node {
            command:
                NodeCommand::Maintenance {
                    node,
                    on,
                    off: _,
                    to,
                },
        } => Ok(controller::maintenance::command(
            &to.data_dir,
            to.controller.as_deref(),
            &node,
            on,
            to.key.as_deref(),
        )),
        Command::Node {
            command:
                NodeCommand::Token {
                    command:
                        TokenCommand::Create {
                            node,
                            ttl,
                            data_dir,
                            state,
                        },
                },
        } => crate::tokens::create(&node, &ttl, &data_dir, state.as_deref()),
        Command::Node {
            command: NodeCommand::Revoke { node, to },
        } => Ok(controller::actions::command(
            &to.data_dir,
            to.controller.as_deref(),
            &controller::node_keys::action(&node),
            &format!("/api/v1/nodes/{node}/revoke"),
            to.key.as_deref(),
        )),
        Command::Node {
            command: NodeCommand::Keys { data_dir, state },
        } => crate::tokens::keys(&data_dir, state.as_deref()),
        Command::Sync {
            controller,
            data_dir,
            approve,
            key,
        } => Ok(controller::sync_api::sync_command(
            &data_dir,
            controller.as_deref(),
            approve.as_deref(),
            key.as_deref(),
        )),
    }
}
