//! Live migration on the node (issue 17): the node drives its VMM's control socket;
//! the controller is the commander and alone decides who owns the VM.
//!
//! - destination: [`Vms::prepare_incoming`] spawns `cairn-vmm --incoming` for a VM
//!   defined here and answers with the address it listens on;
//! - source: [`Vms::migrate`] starts the VMM's pre-copy and answers at
//!   `ready-to-commit` (source paused, in-flight block requests drained and flushed,
//!   the destination holding the final state) or at a failure;
//! - both: [`Vms::commit_migration`] once the controller recorded the destination,
//!   [`Vms::abort_migration`] while the record still names the source.
//!
//! The VMM's own rules (vmm/ARCHITECTURE.md, "Live migration") make this safe: a
//! source never resumes by itself once its final state began to leave, a destination
//! never runs before a commit, and a committed source never runs again.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use network::NetNs;
use proto::v1::{self, VmState};
use tonic::Status;
use vmm::control::{ControlClient, MigrationStatus, Request, Response};

use super::{Started, Vms, log_tail, state_name};

/// How long a control request of a migration may take (the VMM answers at once).
const CONTROL: Duration = Duration::from_secs(2);
/// How often a migration's progress is read.
const POLL: Duration = Duration::from_millis(5);
/// The longest a MigrateVm or PrepareIncomingVm waits (within the API's 30 s).
pub const MAX_WAIT_MS: u32 = 25_000;

/// Source phases at which [`Vms::migrate`] answers.
const SOURCE_SETTLED: [&str; 5] = [
    "ready-to-commit",
    "failed-resumed",
    "failed-paused",
    "aborted",
    "committed",
];

/// One control request to the VMM behind `socket`, off the async runtime.
pub(super) async fn control(socket: PathBuf, request: Request) -> Result<Response, String> {
    tokio::task::spawn_blocking(move || {
        let mut client = ControlClient::connect(&socket, CONTROL).map_err(|e| e.to_string())?;
        let response = client.request(&request).map_err(|e| e.to_string())?;
        if response.ok {
            Ok(response)
        } else {
            Err(response.error.unwrap_or_else(|| "refused".into()))
        }
    })
    .await
    .map_err(|error| error.to_string())?
}

/// The migration status of the VMM behind `socket`; `None`: none was started.
async fn status_of(socket: &Path) -> Result<Option<MigrationStatus>, String> {
    match control(socket.to_path_buf(), Request::MigrationStatus).await {
        Ok(response) => Ok(response.migration),
        Err(error) if error.contains("no migration was started") => Ok(None),
        Err(error) => Err(error),
    }
}

/// The node API's figures of one side.
fn result_of(name: &str, status: &MigrationStatus, stop_and_copy: bool) -> v1::MigrationResult {
    v1::MigrationResult {
        name: name.to_string(),
        role: status.role.clone(),
        phase: status.phase.clone(),
        rounds: status.rounds,
        pages: status.pages,
        bytes_sent: status.bytes,
        memory_bytes: status.memory_bytes,
        resident_bytes: status.resident_bytes,
        paused_ms: status.paused_ms,
        total_ms: status.total_ms,
        link_mb_per_s: status.link_mb_per_s,
        throttle_percent: u32::from(status.throttle_percent),
        mode: if stop_and_copy {
            "stop-and-copy"
        } else {
            "pre-copy"
        }
        .into(),
        error: status.error.clone().unwrap_or_default(),
        vm: None,
    }
}

/// The address the VMM printed in its log (`{"event":EVENT,"listening":ADDR}`; the
/// event is `incoming` for a migration's destination, `ft-secondary` for a
/// fault-tolerance secondary).
pub(super) fn listening_address(log: &Path, event: &str) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|line| {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        (value.get("event")?.as_str()? == event)
            .then(|| value.get("listening")?.as_str().map(str::to_string))
            .flatten()
    })
}

/// Whom a VMM spawned without running its guest waits for, as [`Vms::prepare_waiting`]
/// names and records it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Waiter {
    /// A live migration's destination.
    Migration,
    /// A fault-tolerant VM's secondary.
    FtSecondary,
}

impl Waiter {
    /// Where the runtime keeps the address it listens on.
    fn slot(self, runtime: &mut super::VmRuntime) -> &mut Option<String> {
        match self {
            Self::Migration => &mut runtime.incoming,
            Self::FtSecondary => &mut runtime.ft_secondary,
        }
    }

    /// The VMM's event that names the address.
    fn event(self) -> &'static str {
        match self {
            Self::Migration => "incoming",
            Self::FtSecondary => "ft-secondary",
        }
    }

    fn role(self) -> &'static str {
        match self {
            Self::Migration => "a migration's destination",
            Self::FtSecondary => "a fault-tolerance secondary",
        }
    }

    fn process(self) -> &'static str {
        match self {
            Self::Migration => "the incoming cairn-vmm",
            Self::FtSecondary => "the fault-tolerance secondary's cairn-vmm",
        }
    }

    fn first(self) -> &'static str {
        match self {
            Self::Migration => "before preparing a migration to it",
            Self::FtSecondary => "before preparing it as a fault-tolerance secondary",
        }
    }

    fn peer(self, listen: &str) -> super::PeerWait<'_> {
        match self {
            Self::Migration => super::PeerWait::Migration(listen),
            Self::FtSecondary => super::PeerWait::FtPrimary(listen),
        }
    }
}

impl Vms {
    pub(super) fn control_socket(&self, name: &str) -> PathBuf {
        self.run_dir.join(name).join("control.sock")
    }

    /// Waits (up to 5 s) until the VMM `pid` of `name` is reaped.
    pub(super) async fn await_reaped(&self, name: &str, pid: u32) {
        let reaped_by = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < reaped_by {
            let reaped = self
                .vms
                .lock()
                .await
                .get(name)
                .is_none_or(|runtime| runtime.pid != pid);
            if reaped {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Spawns the VM's VMM as a migration's destination listening on `listen_ip` (port
    /// chosen by the kernel) and answers with its address once it listens. The VM must
    /// be defined here and not run; a destination already prepared answers again.
    pub async fn prepare_incoming(
        &self,
        name: &str,
        network: Option<&NetNs>,
        listen_ip: IpAddr,
        timeout: Duration,
    ) -> Result<v1::IncomingVmResult, Status> {
        let (listen_address, pid) = self
            .prepare_waiting(name, network, listen_ip, timeout, Waiter::Migration)
            .await?;
        Ok(v1::IncomingVmResult {
            name: name.to_string(),
            listen_address,
            pid,
        })
    }

    /// Spawns the VM's VMM as `waiter` (a migration's destination, a fault-tolerance
    /// secondary) listening on `listen_ip`, port chosen by the kernel, and answers with
    /// its address and pid once it listens. The VM must be defined here and not run;
    /// one already prepared answers again (one being prepared is waited for).
    pub(super) async fn prepare_waiting(
        &self,
        name: &str,
        network: Option<&NetNs>,
        listen_ip: IpAddr,
        timeout: Duration,
        waiter: Waiter,
    ) -> Result<(String, u32), Status> {
        let (pid, generation) = {
            let mut vms = self.vms.lock().await;
            let Some(runtime) = vms.get_mut(name) else {
                return Err(Status::not_found(format!(
                    "vm `{name}` is not defined on this node; create it first (CreateVm) {}",
                    waiter.first()
                )));
            };
            match waiter.slot(runtime).clone() {
                Some(address) if runtime.pid != 0 && !address.is_empty() => {
                    return Ok((address, runtime.pid));
                }
                // Another prepare waits for this VMM to listen: wait with it.
                Some(_) if runtime.pid != 0 => (runtime.pid, runtime.generation),
                _ => {
                    if runtime.pid != 0 || runtime.state == VmState::Running {
                        return Err(Status::failed_precondition(format!(
                            "vm `{name}` runs on this node already ({}, pid {}): it cannot be {} here",
                            state_name(runtime.state),
                            runtime.pid,
                            waiter.role()
                        )));
                    }
                    if let Some(reason) = self.hypervisor.unavailable() {
                        return Err(Status::failed_precondition(reason));
                    }
                    let Some(definition) = runtime.record.definition.clone() else {
                        return Err(Status::internal(format!(
                            "vm `{name}` has no stored definition"
                        )));
                    };
                    let listen = std::net::SocketAddr::new(listen_ip, 0).to_string();
                    self.launch_vmm(
                        runtime,
                        name,
                        &definition,
                        network,
                        Some(waiter.peer(&listen)),
                    )
                    .await?
                }
            }
        };
        let log = self.run_dir.join(name).join("vmm.log");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(address) = listening_address(&log, waiter.event()) {
                let mut vms = self.vms.lock().await;
                if let Some(runtime) = vms.get_mut(name)
                    && runtime.generation == generation
                    && runtime.pid == pid
                    && waiter.slot(runtime).is_some()
                {
                    *waiter.slot(runtime) = Some(address.clone());
                    return Ok((address, pid));
                }
            }
            let ended = self
                .vms
                .lock()
                .await
                .get(name)
                .is_none_or(|runtime| runtime.generation != generation || runtime.pid == 0);
            if ended {
                return Err(Status::failed_precondition(format!(
                    "vm `{name}`: {} (pid {pid}) ended before it listened{}",
                    waiter.process(),
                    log_tail(&log)
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                self.hypervisor.signal(pid, libc::SIGKILL);
                return Err(Status::deadline_exceeded(format!(
                    "vm `{name}`: {} (pid {pid}) did not listen within {} ms and was killed{}",
                    waiter.process(),
                    timeout.as_millis(),
                    log_tail(&log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The VMM `started` waited as `waiter` and was told to run (committed, promoted):
    /// the VM is kept as running here from now on, and the answer comes once it is seen
    /// running.
    pub(super) async fn now_runs_here(
        &self,
        name: &str,
        waiter: Waiter,
        started: Started,
        timeout: Duration,
    ) -> Result<v1::VmResult, Status> {
        {
            let mut vms = self.vms.lock().await;
            if let Some(runtime) = vms.get_mut(name)
                && runtime.generation == started.generation
            {
                *waiter.slot(runtime) = None;
                runtime.record.desired_running = true;
                let record = runtime.record.clone();
                self.persist(name, &record)?;
            }
        }
        self.await_running(name, started, timeout).await
    }

    /// Refuses a VM that is not defined here or does not run (`to_be`: what only a
    /// running VM can be).
    pub(super) async fn require_running(&self, name: &str, to_be: &str) -> Result<(), Status> {
        let vms = self.vms.lock().await;
        let Some(runtime) = vms.get(name) else {
            return Err(Status::not_found(format!(
                "vm `{name}` is not defined on this node"
            )));
        };
        if runtime.state != VmState::Running || runtime.pid == 0 {
            return Err(Status::failed_precondition(format!(
                "vm `{name}` is {} on this node, not running: {to_be}",
                state_name(runtime.state)
            )));
        }
        Ok(())
    }

    /// Migrates the running VM to the destination VMM at `to` and answers when it is
    /// ready to commit or failed (the phase says which). A migration still in pre-copy
    /// after `timeout` is aborted (the source runs on). Asking again while a migration
    /// of this VM is under way follows that one.
    pub async fn migrate(
        &self,
        name: &str,
        to: &str,
        max_downtime_ms: u64,
        stop_and_copy: bool,
        timeout: Duration,
    ) -> Result<v1::MigrationResult, Status> {
        self.require_running(name, "only a running VM migrates live")
            .await?;
        let socket = self.control_socket(name);
        let fail = |error: String| {
            Status::failed_precondition(format!("vm `{name}`: migration to {to}: {error}"))
        };
        let under_way = status_of(&socket)
            .await
            .map_err(fail)?
            .is_some_and(|status| {
                status.role == "source"
                    && !matches!(status.phase.as_str(), "aborted" | "failed-resumed")
            });
        if !under_way {
            control(
                socket.clone(),
                Request::Migrate {
                    to: to.to_string(),
                    max_downtime_ms,
                    stop_and_copy,
                },
            )
            .await
            .map_err(fail)?;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = status_of(&socket)
                .await
                .map_err(fail)?
                .ok_or_else(|| fail("the VMM reports no migration".into()))?;
            if SOURCE_SETTLED.contains(&status.phase.as_str()) {
                return Ok(result_of(name, &status, stop_and_copy));
            }
            if tokio::time::Instant::now() >= deadline && status.phase == "pre-copy" {
                // Still converging: give it up while the source alone holds the VM.
                let aborted = control(socket.clone(), Request::MigrateAbort).await;
                let mut result = result_of(name, &status, stop_and_copy);
                result.phase = "aborted".into();
                result.error = format!(
                    "did not converge within {} ms ({} rounds, {} bytes sent); aborted, the VM runs on here{}",
                    timeout.as_millis(),
                    status.rounds,
                    status.bytes,
                    aborted
                        .err()
                        .map(|e| format!(" (abort: {e})"))
                        .unwrap_or_default()
                );
                return Ok(result);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The commit, on either side. Source: the VMM tells the destination to start (if
    /// the link works) and exits; the VM is `STOPPED` here. Destination: starts the VM
    /// if the source's word did not reach it and answers once it is seen running.
    pub async fn commit_migration(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<v1::MigrationResult, Status> {
        let (incoming, pid, generation, builtin) = {
            let vms = self.vms.lock().await;
            let Some(runtime) = vms.get(name) else {
                return Err(Status::not_found(format!(
                    "vm `{name}` is not defined on this node"
                )));
            };
            let builtin = matches!(
                runtime
                    .record
                    .definition
                    .as_ref()
                    .and_then(|d| d.image.as_ref()),
                Some(v1::create_vm::Image::Builtin(_))
            );
            (
                runtime.incoming.is_some(),
                runtime.pid,
                runtime.generation,
                builtin,
            )
        };
        let socket = self.control_socket(name);
        let fail =
            |error: String| Status::failed_precondition(format!("vm `{name}`: commit: {error}"));
        if pid == 0 {
            // A source that already exited after its commit (a retry) has nothing left.
            return Ok(v1::MigrationResult {
                name: name.to_string(),
                role: if incoming { "destination" } else { "source" }.into(),
                phase: "committed".into(),
                ..Default::default()
            });
        }
        let status = status_of(&socket)
            .await
            .map_err(fail)?
            .ok_or_else(|| fail("its VMM reports no migration".into()))?;
        if !incoming {
            if status.role != "source" {
                return Err(fail(format!("its VMM is a migration's {}", status.role)));
            }
            if !matches!(
                status.phase.as_str(),
                "ready-to-commit" | "failed-paused" | "committed"
            ) {
                return Err(fail(format!(
                    "the source is in phase `{}`: only a source whose final state left can be committed",
                    status.phase
                )));
            }
            if let Some(runtime) = self.vms.lock().await.get_mut(name)
                && runtime.pid == pid
            {
                // Its exit is the move's, not a stop or a crash.
                runtime.stop_requested = true;
                runtime.start_failure = Some(format!("migrated to {}", status.peer));
            }
            let committed = control(socket.clone(), Request::MigrateCommit).await;
            // The VMM exits right after it answers: wait until it is reaped.
            self.await_reaped(name, pid).await;
            let mut result = result_of(name, &status, false);
            match committed {
                Ok(response) => {
                    if let Some(after) = response.migration {
                        result.phase = after.phase;
                    }
                }
                // The process may have exited before its answer arrived.
                Err(error) => result.error = error,
            }
            return Ok(result);
        }
        match status.phase.as_str() {
            "ready" => {
                control(socket.clone(), Request::MigrateCommit)
                    .await
                    .map_err(fail)?;
            }
            "committed" => {}
            phase => {
                return Err(fail(format!(
                    "the destination is in phase `{phase}`: it does not hold the final state"
                )));
            }
        }
        let running = self
            .now_runs_here(
                name,
                Waiter::Migration,
                Started {
                    pid,
                    generation,
                    builtin,
                },
                timeout,
            )
            .await?;
        let status = status_of(&socket).await.ok().flatten().unwrap_or(status);
        let mut result = result_of(name, &status, false);
        result.vm = Some(running);
        Ok(result)
    }

    /// Gives the migration up on this side: a source resumes, a destination ends
    /// without having run. Nothing to give up is fine.
    pub async fn abort_migration(&self, name: &str) -> Result<v1::MigrationResult, Status> {
        let (incoming, pid) = {
            let vms = self.vms.lock().await;
            let Some(runtime) = vms.get(name) else {
                return Err(Status::not_found(format!(
                    "vm `{name}` is not defined on this node"
                )));
            };
            (runtime.incoming.is_some(), runtime.pid)
        };
        let role = if incoming { "destination" } else { "source" };
        let nothing = || v1::MigrationResult {
            name: name.to_string(),
            role: role.into(),
            phase: "aborted".into(),
            ..Default::default()
        };
        if pid == 0 {
            return Ok(nothing());
        }
        let socket = self.control_socket(name);
        let fail =
            |error: String| Status::failed_precondition(format!("vm `{name}`: abort: {error}"));
        let Some(status) = status_of(&socket).await.map_err(fail)? else {
            return Ok(nothing());
        };
        if status.phase == "committed" {
            return Err(fail(format!(
                "the migration is committed on this {} already: it cannot be aborted",
                status.role
            )));
        }
        let settled_running = matches!(status.phase.as_str(), "aborted" | "failed-resumed");
        let response = if settled_running {
            None
        } else {
            Some(
                control(socket.clone(), Request::MigrateAbort)
                    .await
                    .map_err(fail)?,
            )
        };
        if incoming {
            self.await_reaped(name, pid).await;
        }
        let mut result = result_of(name, &status, false);
        result.phase = response
            .and_then(|r| r.migration)
            .map_or_else(|| status.phase.clone(), |m| m.phase);
        Ok(result)
    }
}
