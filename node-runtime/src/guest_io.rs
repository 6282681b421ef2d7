//! Guest I/O that people can see (issue 15, item 6): `Apply.GuestDiskIo` has the
//! built-in guest of a running VM write a seeded pattern to, or read and checksum, a
//! range of one of its disks through its own virtio-blk driver (the VMM's
//! `guest-disk-io` control request), and Observe shows the guest's own I/O counters
//! and each disk's copies at a glance next to the VMM's counters.

use std::time::Duration;

use proto::v1::{self, Health};
use tonic::Status;
use vmm::control::{ClientError, ControlClient, GuestDiskAction, GuestDiskCounters};

use crate::validate;
use crate::vms::Vms;

const FIELD: &str = "guest_disk_io_request";
/// The wait for the guest when the request gives none.
pub const DEFAULT_TIMEOUT_MS: u32 = 20_000;
/// The longest wait a request may ask for (the node API's calls time out after 30 s).
pub const MAX_TIMEOUT_MS: u32 = 25_000;

/// Carries out `Apply.GuestDiskIo` on a VM of this node.
pub async fn run(
    vms: &Vms,
    request: v1::GuestDiskIoRequest,
) -> Result<v1::GuestDiskIoResponse, Status> {
    validate::name(&format!("{FIELD}.vm"), &request.vm)?;
    let action = match v1::GuestDiskOp::try_from(request.op) {
        Ok(v1::GuestDiskOp::WritePattern) => GuestDiskAction::WritePattern,
        Ok(v1::GuestDiskOp::ReadChecksum) => GuestDiskAction::ReadChecksum,
        _ => {
            return Err(validate::invalid(
                &format!("{FIELD}.op"),
                format!(
                    "{} is not an operation; use WRITE_PATTERN (1) or READ_CHECKSUM (2)",
                    request.op
                ),
            ));
        }
    };
    let timeout_ms = match request.timeout_ms {
        0 => DEFAULT_TIMEOUT_MS,
        ms @ 1..=MAX_TIMEOUT_MS => ms,
        other => {
            return Err(validate::invalid(
                &format!("{FIELD}.timeout_ms"),
                format!("{other} is more than {MAX_TIMEOUT_MS} (or 0 for {DEFAULT_TIMEOUT_MS})"),
            ));
        }
    };
    if !request.offset.is_multiple_of(512)
        || !request.length.is_multiple_of(512)
        || request.length == 0
    {
        return Err(validate::invalid(
            &format!("{FIELD}.offset/length"),
            format!(
                "offset {} and length {} must be multiples of 512, the length at least 512",
                request.offset, request.length
            ),
        ));
    }
    if request.length > vmm::handle::MAX_GUEST_IO_BYTES {
        return Err(validate::invalid(
            &format!("{FIELD}.length"),
            format!("{} is more than 1 GiB", request.length),
        ));
    }
    let (socket, builtin, disks) = vms.running_disks(&request.vm).await?;
    if !builtin {
        return Err(Status::failed_precondition(format!(
            "VM {} does not run the built-in guest (cairn-guest); only it does disk I/O on command",
            request.vm
        )));
    }
    let Some(disk) = disks.get(request.disk as usize) else {
        return Err(validate::invalid(
            &format!("{FIELD}.disk"),
            format!(
                "VM {} has {} disk(s), numbered from 0; there is no disk {}",
                request.vm,
                disks.len(),
                request.disk
            ),
        ));
    };
    if !disk.attached {
        return Err(Status::failed_precondition(format!(
            "disk {} of VM {} (volume {}) is not attached{}",
            request.disk,
            request.vm,
            disk.volume,
            if disk.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", disk.detail)
            }
        )));
    }
    let (volume, device) = (disk.volume.clone(), disk.device);
    let vmm_request = vmm::control::GuestDiskIoRequest {
        disk: device,
        action,
        offset: request.offset,
        length: request.length,
        seed: request.seed,
        timeout_ms: Some(u64::from(timeout_ms)),
    };
    let read_timeout = Duration::from_millis(u64::from(timeout_ms) + 2_000);
    let answer = tokio::task::spawn_blocking(move || {
        ControlClient::connect(&socket, read_timeout)?.guest_disk_io(vmm_request)
    })
    .await
    .map_err(|error| Status::internal(format!("guest disk I/O task failed: {error}")))?;
    let what = format!("VM {} disk {} (volume {volume})", request.vm, request.disk);
    let result = answer.map_err(|error| match error {
        ClientError::Refused(reason) => Status::failed_precondition(format!("{what}: {reason}")),
        other => Status::unavailable(format!("{what}: the VMM did not answer: {other}")),
    })?;
    Ok(v1::GuestDiskIoResponse {
        volume,
        device,
        crc32c: result.crc32c,
        guest_requests: result.counters.requests,
        guest_bytes_read: result.counters.bytes_read,
        guest_bytes_written: result.counters.bytes_written,
        guest_errors: result.counters.errors,
        elapsed_ms: result.elapsed_ms,
    })
}

/// Puts the guest's own counters of each attached disk (the VMM's devices, in order)
/// next to the VMM's.
pub fn fill_guest_counters(disks: &mut [v1::VmDiskStatus], guest: &[GuestDiskCounters]) {
    let attached = disks.iter_mut().filter(|disk| disk.attached);
    for (disk, counters) in attached.zip(guest) {
        disk.guest_requests = counters.requests;
        disk.guest_bytes_read = counters.bytes_read;
        disk.guest_bytes_written = counters.bytes_written;
        disk.guest_errors = counters.errors;
    }
}

/// A primary copy's copies at a glance: `in-sync` (healthy, every copy in the epoch's
/// in-sync set, none awaiting removal), `resyncing` (a copy outside the in-sync set has
/// caught up, or the writer has shipped catch-up bytes to one, which is still outside)
/// or `degraded`.
pub fn copies_state(volume: &v1::VolumeStatus) -> &'static str {
    let copies = 1 + volume.replica_peers.len();
    let behind = !volume.in_sync.is_empty() && volume.in_sync.len() < copies;
    if volume.health == Health::Healthy as i32 && volume.awaiting_removal.is_empty() && !behind {
        "in-sync"
    } else if behind && (!volume.caught_up.is_empty() || volume.resync_bytes > 0) {
        "resyncing"
    } else {
        "degraded"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(
        health: Health,
        in_sync: &[&str],
        caught_up: &[&str],
        resync: u64,
    ) -> v1::VolumeStatus {
        v1::VolumeStatus {
            name: "db-data".into(),
            health: health as i32,
            replica_peers: vec!["lab-2".into()],
            in_sync: in_sync.iter().map(|s| s.to_string()).collect(),
            caught_up: caught_up.iter().map(|s| s.to_string()).collect(),
            resync_bytes: resync,
            ..Default::default()
        }
    }

    #[test]
    fn copies_are_in_sync_degraded_or_resyncing() {
        assert_eq!(
            copies_state(&volume(Health::Healthy, &[], &[], 0)),
            "in-sync"
        );
        assert_eq!(
            copies_state(&volume(Health::Healthy, &["lab-1", "lab-2"], &[], 0)),
            "in-sync"
        );
        assert_eq!(
            copies_state(&volume(Health::Degraded, &["lab-1"], &[], 0)),
            "degraded"
        );
        assert_eq!(
            copies_state(&volume(Health::Degraded, &["lab-1"], &[], 4096)),
            "resyncing"
        );
        assert_eq!(
            copies_state(&volume(Health::Degraded, &["lab-1"], &["lab-2"], 0)),
            "resyncing"
        );
        assert_eq!(
            copies_state(&volume(Health::Degraded, &[], &[], 0)),
            "degraded"
        );
    }

    #[test]
    fn the_guest_counters_go_to_the_attached_disks_in_order() {
        let mut disks = vec![
            v1::VmDiskStatus {
                volume: "a".into(),
                attached: true,
                ..Default::default()
            },
            v1::VmDiskStatus {
                volume: "b".into(),
                attached: false,
                ..Default::default()
            },
            v1::VmDiskStatus {
                volume: "c".into(),
                attached: true,
                device: 1,
                ..Default::default()
            },
        ];
        let guest = [
            GuestDiskCounters {
                requests: 2,
                bytes_read: 4096,
                bytes_written: 4096,
                errors: 0,
            },
            GuestDiskCounters {
                requests: 5,
                bytes_read: 0,
                bytes_written: 20480,
                errors: 1,
            },
        ];
        fill_guest_counters(&mut disks, &guest);
        assert_eq!(disks[0].guest_requests, 2);
        assert_eq!(disks[1].guest_requests, 0);
        assert_eq!(
            (disks[2].guest_bytes_written, disks[2].guest_errors),
            (20480, 1)
        );
    }
}
