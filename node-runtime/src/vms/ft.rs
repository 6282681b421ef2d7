//! Fault-tolerant VMs on the node (issue 22): the node drives its VMM's control
//! socket; the controller and the witness (`vm/NAME`) decide which side runs.
//!
//! - secondary's node: [`Vms::prepare_ft_secondary`] spawns `cairn-vmm --ft-secondary`
//!   for a VM defined here and answers with the address it receives checkpoints on;
//!   [`Vms::promote_ft`] resumes it from the last complete checkpoint;
//! - primary's node: [`Vms::start_ft`] makes the running VM checkpoint there every
//!   epoch and answers once the first checkpoint is acknowledged (or why not);
//! - either: [`Vms::stop_ft`] (a primary runs alone and releases the output it held; a
//!   secondary ends without having run).
//!
//! The VMM's rules (vmm/ARCHITECTURE.md, "Fault tolerance") make this safe: output
//! leaves a primary only once the checkpoint that produced it is on the secondary, a
//! secondary never runs before a promotion, and neither acts on a lost link by itself.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use network::NetNs;
use proto::v1::{self, VmState};
use tonic::Status;
use vmm::control::Request;
use vmm::control::wire::FtStatus;

use super::migration::{Waiter, control};
use super::{Started, Vms, state_name};

/// How often [`Vms::start_ft`] reads the primary's progress.
const POLL: Duration = Duration::from_millis(10);

/// Primary phases at which [`Vms::start_ft`] follows the protection under way instead
/// of starting another.
const PRIMARY_ACTIVE: [&str; 4] = ["connecting", "initial-copy", "protected", "secondary-lost"];

/// The node API's view of one side of a pair.
pub fn wire(status: &FtStatus) -> v1::VmFt {
    v1::VmFt {
        role: status.role.clone(),
        phase: status.phase.clone(),
        peer: status.peer.clone(),
        epoch_ms: status.epoch_ms,
        epoch: status.epoch,
        last_acked: status.last_acked,
        initial_bytes: status.initial_bytes,
        initial_ms: status.initial_ms,
        bytes_total: status.bytes_total,
        last_epoch_bytes: status.last_epoch_bytes,
        median_epoch_bytes: status.median_epoch_bytes,
        median_epoch_pages: status.median_epoch_pages,
        median_paused_ms: status.median_paused_ms,
        median_ack_ms: status.median_ack_ms,
        median_output_delay_ms: status.median_output_delay_ms,
        frames_held: status.frames_held,
        frames_released: status.frames_released,
        frames_discarded: status.frames_discarded,
        disk_writes_shipped: status.disk_writes_shipped,
        promote_ms: status.promote_ms,
        error: status.error.clone().unwrap_or_default(),
        ..Default::default()
    }
}

/// The fault-tolerance status of the VMM behind `socket`; `None`: it is no side of a
/// pair.
async fn ft_status(socket: &Path) -> Result<Option<FtStatus>, String> {
    match control(socket.to_path_buf(), Request::FtStatus).await {
        Ok(response) => Ok(response.ft),
        Err(error) if error.contains("no fault-tolerance primary or secondary") => Ok(None),
        Err(error) => Err(error),
    }
}

fn result(name: &str, ft: Option<&FtStatus>) -> v1::FtResult {
    v1::FtResult {
        name: name.to_string(),
        ft: ft.map(wire),
        ..Default::default()
    }
}

impl Vms {
    /// Spawns the VM's VMM as a fault-tolerance secondary receiving checkpoints on
    /// `listen_ip` (port chosen by the kernel) and answers with its address once it
    /// listens. The VM must be defined here and not run; a secondary already prepared
    /// answers again.
    pub async fn prepare_ft_secondary(
        &self,
        name: &str,
        network: Option<&NetNs>,
        listen_ip: IpAddr,
        timeout: Duration,
    ) -> Result<v1::FtResult, Status> {
        if let Some(definition) = self.definition(name).await
            && !definition.volumes.is_empty()
        {
            return Err(Status::failed_precondition(format!(
                "vm `{name}` has volumes ({}): a fault-tolerant VM's disks need a copy of their own on each side, written only by that side's VMM, which this node does not provide yet; only VMs without volumes can be protected",
                definition.volumes.join(", ")
            )));
        }
        let (listen_address, pid) = self
            .prepare_waiting(name, network, listen_ip, timeout, Waiter::FtSecondary)
            .await?;
        Ok(v1::FtResult {
            name: name.to_string(),
            listen_address,
            pid,
            ..Default::default()
        })
    }

    /// Makes the running VM a primary checkpointing to the secondary VMM at `to` and
    /// answers once the secondary acknowledged a first checkpoint (phase `protected`),
    /// or when it could not be protected (`unprotected`, with why), or at `timeout`
    /// with the phase reached. Asking again while this VM is protected by (or being
    /// protected by) the same secondary follows that protection.
    pub async fn start_ft(
        &self,
        name: &str,
        to: &str,
        epoch_ms: u64,
        sync_disks: bool,
        timeout: Duration,
    ) -> Result<v1::FtResult, Status> {
        self.require_running(name, "only a running VM can be a fault-tolerance primary")
            .await?;
        let socket = self.control_socket(name);
        let fail = |error: String| {
            Status::failed_precondition(format!(
                "vm `{name}`: fault tolerance with the secondary at {to}: {error}"
            ))
        };
        let current = ft_status(&socket).await.map_err(fail)?;
        let under_way = current.as_ref().filter(|status| {
            status.role == "primary" && PRIMARY_ACTIVE.contains(&status.phase.as_str())
        });
        match under_way {
            Some(status) if status.peer != to => {
                return Err(fail(format!(
                    "it is already a primary checkpointing to {} (phase {}); stop that first (StopFt)",
                    status.peer, status.phase
                )));
            }
            Some(_) => {}
            None => {
                control(
                    socket.clone(),
                    Request::FtStart {
                        to: to.to_string(),
                        epoch_ms,
                        sync_disks,
                    },
                )
                .await
                .map_err(fail)?;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = ft_status(&socket)
                .await
                .map_err(fail)?
                .ok_or_else(|| fail("the VMM reports no fault tolerance".into()))?;
            let settled = match status.phase.as_str() {
                "protected" => status.last_acked > 0,
                "unprotected" | "secondary-lost" => true,
                _ => false,
            };
            if settled || tokio::time::Instant::now() >= deadline {
                return Ok(result(name, Some(&status)));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Promotes the fault-tolerance secondary of `name`: its VMM resumes the last
    /// complete checkpoint and runs; answers once the VM is seen running. Asking again
    /// once it runs answers the same.
    pub async fn promote_ft(&self, name: &str, timeout: Duration) -> Result<v1::FtResult, Status> {
        let (pid, generation, builtin) = {
            let vms = self.vms.lock().await;
            let Some(runtime) = vms.get(name) else {
                return Err(Status::not_found(format!(
                    "vm `{name}` is not defined on this node"
                )));
            };
            if runtime.ft_secondary.is_none() || runtime.pid == 0 {
                if runtime.state == VmState::Running && runtime.pid != 0 {
                    // Promoted already (a retry), or it runs here anyway.
                    let ft = ft_status(&self.control_socket(name)).await.ok().flatten();
                    let mut answer = result(name, ft.as_ref());
                    answer.pid = runtime.pid;
                    answer.vm = Some(v1::VmResult {
                        name: name.to_string(),
                        state: state_name(runtime.state),
                        pid: runtime.pid,
                    });
                    return Ok(answer);
                }
                return Err(Status::failed_precondition(format!(
                    "vm `{name}` is {} on this node and has no fault-tolerance secondary here to promote (PrepareFtSecondary and a primary's StartFt come first)",
                    state_name(runtime.state)
                )));
            }
            let builtin = matches!(
                runtime
                    .record
                    .definition
                    .as_ref()
                    .and_then(|d| d.image.as_ref()),
                Some(v1::create_vm::Image::Builtin(_))
            );
            (runtime.pid, runtime.generation, builtin)
        };
        let socket = self.control_socket(name);
        control(socket.clone(), Request::FtPromote)
            .await
            .map_err(|error| {
                Status::failed_precondition(format!("vm `{name}`: promotion refused: {error}"))
            })?;
        let running = self
            .now_runs_here(
                name,
                Waiter::FtSecondary,
                Started {
                    pid,
                    generation,
                    builtin,
                },
                timeout,
            )
            .await?;
        let ft = ft_status(&socket).await.ok().flatten();
        let mut answer = result(name, ft.as_ref());
        answer.pid = pid;
        answer.vm = Some(running);
        Ok(answer)
    }

    /// Ends the VMM of `name` at once (SIGKILL): the witness gave the VM to the other
    /// side of its pair. The VM is `STOPPED` with `fenced: WHY` as its last exit.
    pub async fn fence_now(&self, name: &str, why: &str) {
        let pid = {
            let mut vms = self.vms.lock().await;
            let Some(runtime) = vms.get_mut(name) else {
                return;
            };
            if runtime.pid == 0 {
                return;
            }
            runtime.stop_requested = true;
            runtime.start_failure = Some(format!("fenced: {why}"));
            runtime.pid
        };
        self.hypervisor.signal(pid, libc::SIGKILL);
        self.await_reaped(name, pid).await;
    }

    /// Ends fault tolerance on this side. A primary releases the output it held, in
    /// order, and runs alone; a secondary's VMM ends without having run (`STOPPED`).
    /// Nothing to stop (no VMM, or one that is no side of a pair) is fine.
    pub async fn stop_ft(&self, name: &str) -> Result<v1::FtResult, Status> {
        let (pid, secondary) = {
            let vms = self.vms.lock().await;
            let Some(runtime) = vms.get(name) else {
                return Err(Status::not_found(format!(
                    "vm `{name}` is not defined on this node"
                )));
            };
            (runtime.pid, runtime.ft_secondary.is_some())
        };
        if pid == 0 {
            return Ok(result(name, None));
        }
        let socket = self.control_socket(name);
        let fail =
            |error: String| Status::failed_precondition(format!("vm `{name}`: ft-stop: {error}"));
        let Some(before) = ft_status(&socket).await.map_err(fail)? else {
            return Ok(result(name, None));
        };
        let stopped = match control(socket.clone(), Request::FtStop).await {
            Ok(response) => response.ft,
            // Stopped already (a retry), or it ended (a primary left unprotected).
            Err(error) if error.contains("does not run here") => {
                ft_status(&socket).await.ok().flatten()
            }
            Err(error) if secondary && before.role == "secondary" => {
                // The VMM may have exited before its answer arrived.
                self.await_reaped(name, pid).await;
                let gone = self
                    .vms
                    .lock()
                    .await
                    .get(name)
                    .is_none_or(|runtime| runtime.pid != pid);
                if !gone {
                    return Err(fail(error));
                }
                None
            }
            Err(error) => return Err(fail(error)),
        };
        if secondary {
            // Its VMM exits (7) right after it answers: wait until it is reaped.
            self.await_reaped(name, pid).await;
        }
        Ok(result(name, stopped.as_ref().or(Some(&before))))
    }
}
