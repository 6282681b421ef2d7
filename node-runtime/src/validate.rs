//! Checks of request fields. Every refusal is `InvalidArgument` naming the field
//! (as `message.field`) and the problem, so an operator can fix the request.

use tonic::Status;
use vm_config::limits::{self, Limit};

/// Largest data payload of one write or read.
pub const MAX_IO_BYTES: u64 = 4 * 1024 * 1024;
/// Largest volume: the runtime's limit on a disk (`vm_config::limits::DISK_SIZE`).
pub const MAX_VOLUME_BYTES: u64 = limits::DISK_SIZE.max;
/// Smallest and largest stripe unit.
pub const MIN_STRIPE_UNIT: u64 = 4 * 1024;
/// Largest stripe unit.
pub const MAX_STRIPE_UNIT: u64 = 64 * 1024 * 1024;
/// Largest stripe width.
pub const MAX_STRIPE_WIDTH: u32 = 64;
/// I/O alignment of offsets and lengths (the volume engine's block size).
pub const SECTOR: u64 = 4096;

// The limits table's disk granularity is the engine's block, which is also what
// volume sizes and I/O are checked against here.
const _: () =
    assert!(storage::BLOCK_SIZE == limits::DISK_SIZE.granularity && SECTOR == storage::BLOCK_SIZE);

/// `InvalidArgument` for `field`.
pub fn invalid(field: &str, problem: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("field `{field}`: {problem}"))
}

/// An `ApplyBatchRequest` as a whole: 1 to [`proto::APPLY_BATCH_MAX`] requests with
/// distinct request ids, none forwarding the controller's grant
/// ([`proto::forwards_grant`]). Each request is checked as an Apply's when carried out.
pub fn apply_batch(batch: &proto::v1::ApplyBatchRequest) -> Result<(), Status> {
    let field = "apply_batch_request.requests";
    let count = batch.requests.len();
    if count == 0 || count > proto::APPLY_BATCH_MAX {
        return Err(invalid(
            field,
            format!(
                "has {count} requests; a batch carries 1 to {}",
                proto::APPLY_BATCH_MAX
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (at, request) in batch.requests.iter().enumerate() {
        if !seen.insert(request.request_id.as_str()) {
            return Err(invalid(
                &format!("{field}[{at}].request_id"),
                format!(
                    "`{}` is already the id of an earlier request of the batch; each action needs its own",
                    request.request_id
                ),
            ));
        }
        if let Some(action) = &request.action
            && proto::forwards_grant(action)
        {
            return Err(invalid(
                &format!("{field}[{at}].action"),
                format!(
                    "{} forwards the controller's signed request to other nodes, so it is sent alone in an Apply, not in a batch",
                    proto::action_name(action)
                ),
            ));
        }
    }
    Ok(())
}

/// A DNS-label name: `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`.
pub fn name(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > 63 {
        return Err(invalid(
            field,
            format!("is {} characters long, at most 63 allowed", value.len()),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(invalid(
            field,
            format!(
                "`{value}` contains `{bad}`; names are DNS labels: lower-case letters, digits and `-`"
            ),
        ));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(invalid(
            field,
            format!("`{value}` must not start or end with `-`"),
        ));
    }
    Ok(())
}

/// A request id: 1 to 128 characters from `[A-Za-z0-9._:/-]`.
pub fn request_id(value: &str) -> Result<(), Status> {
    request_id_field("apply_request.request_id", value)
}

/// A request id in `field` (as [`request_id`]).
pub fn request_id_field(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid(
            field,
            "must not be empty; give every action a unique id (a UUID is fine)",
        ));
    }
    if value.len() > 128 {
        return Err(invalid(
            field,
            format!("is {} characters long, at most 128 allowed", value.len()),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-')))
    {
        return Err(invalid(
            field,
            format!("contains `{bad}`; allowed are letters, digits and . _ : / -"),
        ));
    }
    Ok(())
}

/// `value` of `field` within one of the runtime's limits on a VM
/// (`vm_config::limits`: the table the compiler checks specs against and `cairn-vmm`
/// checks its configuration against), else `InvalidArgument` with the rule and why.
pub fn within(field: &str, limit: &Limit, value: u64) -> Result<(), Status> {
    limit
        .check(value)
        .map_err(|error| invalid(field, format!("{error}; {}", limit.rule())))
}

/// The vCPUs and memory of a `CreateVm` against the runtime's limits (a Linux kernel
/// also against the MP table's 32 vCPUs), so a VM the VMM would refuse is refused
/// when it is defined, not when it is started.
pub fn vm_resources(create: &proto::v1::CreateVm) -> Result<(), Status> {
    let vcpus = u64::from(create.vcpus);
    within("create_vm.vcpus", &limits::VCPUS, vcpus)?;
    if crate::cgroups::SlaClass::parse(&create.sla).is_none() {
        return Err(invalid(
            "create_vm.sla",
            format!(
                "`{}` is not an SLA class; use \"reserved\", \"on-demand\" or \"spot\" (empty: on-demand)",
                create.sla
            ),
        ));
    }
    if create.dedicated_cpus
        && crate::cgroups::SlaClass::parse(&create.sla) != Some(crate::cgroups::SlaClass::Reserved)
    {
        return Err(invalid(
            "create_vm.dedicated_cpus",
            format!(
                "dedicated CPUs are for reserved VMs; this VM's class is \"{}\" (set sla \"reserved\" or leave dedicated_cpus false)",
                if create.sla.is_empty() {
                    "on-demand"
                } else {
                    &create.sla
                }
            ),
        ));
    }
    if matches!(create.image, Some(proto::v1::create_vm::Image::Kernel(_))) {
        within("create_vm.vcpus", &limits::LINUX_VCPUS, vcpus)?;
    }
    within(
        "create_vm.memory_bytes",
        &limits::MEMORY,
        create.memory_bytes,
    )
}

/// Volume geometry of a create request.
pub fn volume_geometry(
    prefix: &str,
    size_bytes: u64,
    stripe_width: u32,
    stripe_unit_bytes: u64,
) -> Result<(), Status> {
    volume_size(&format!("{prefix}.size_bytes"), size_bytes)?;
    if stripe_width == 0 || stripe_width > MAX_STRIPE_WIDTH {
        return Err(invalid(
            &format!("{prefix}.stripe_width"),
            format!("{stripe_width} is out of range 1..={MAX_STRIPE_WIDTH}"),
        ));
    }
    if !stripe_unit_bytes.is_power_of_two()
        || !(MIN_STRIPE_UNIT..=MAX_STRIPE_UNIT).contains(&stripe_unit_bytes)
    {
        return Err(invalid(
            &format!("{prefix}.stripe_unit_bytes"),
            format!(
                "{stripe_unit_bytes} must be a power of two between 4096 (4 KiB) and 67108864 (64 MiB)"
            ),
        ));
    }
    Ok(())
}

/// A volume size: a positive multiple of 4096, at most [`MAX_VOLUME_BYTES`].
pub fn volume_size(field: &str, size_bytes: u64) -> Result<(), Status> {
    if size_bytes == 0 {
        return Err(invalid(field, "must be at least 4096"));
    }
    if !size_bytes.is_multiple_of(SECTOR) {
        return Err(invalid(
            field,
            format!("{size_bytes} is not a multiple of {SECTOR}"),
        ));
    }
    if size_bytes > MAX_VOLUME_BYTES {
        return Err(invalid(
            field,
            format!("{size_bytes} is larger than the maximum of {MAX_VOLUME_BYTES} (64 TiB)"),
        ));
    }
    Ok(())
}

/// An I/O range within a volume of `size_bytes`.
pub fn io_range(prefix: &str, offset: u64, length: u64, size_bytes: u64) -> Result<(), Status> {
    if !offset.is_multiple_of(SECTOR) {
        return Err(invalid(
            &format!("{prefix}.offset"),
            format!("{offset} is not a multiple of {SECTOR}"),
        ));
    }
    if length == 0 {
        return Err(invalid(&format!("{prefix}.length"), "must not be zero"));
    }
    if !length.is_multiple_of(SECTOR) {
        return Err(invalid(
            &format!("{prefix}.length"),
            format!("{length} is not a multiple of {SECTOR}"),
        ));
    }
    if length > MAX_IO_BYTES {
        return Err(invalid(
            &format!("{prefix}.length"),
            format!("{length} is more than the maximum of {MAX_IO_BYTES} bytes per call"),
        ));
    }
    match offset.checked_add(length) {
        Some(end) if end <= size_bytes => Ok(()),
        _ => Err(invalid(
            &format!("{prefix}.offset"),
            format!("range {offset}+{length} ends beyond the volume's size of {size_bytes} bytes"),
        )),
    }
}

/// A peer's address: `HOST:PORT` or `http://HOST:PORT`.
pub fn address(field: &str, value: &str) -> Result<(), Status> {
    let without_scheme = value.strip_prefix("http://").unwrap_or(value);
    let Some((host, port)) = without_scheme.rsplit_once(':') else {
        return Err(invalid(field, format!("`{value}` is not HOST:PORT")));
    };
    if host.is_empty() {
        return Err(invalid(field, format!("`{value}` has no host")));
    }
    if port.parse::<u16>().map_or(true, |port| port == 0) {
        return Err(invalid(
            field,
            format!("`{value}` has no valid port (1-65535)"),
        ));
    }
    Ok(())
}

/// The kernel and initrd of a `CreateVm` exist on this node (`node`) and can be read:
/// `cairn-vmm` would otherwise fail only at StartVm.
pub fn image_files(create: &proto::v1::CreateVm, node: &str) -> Result<(), Status> {
    let Some(proto::v1::create_vm::Image::Kernel(kernel)) = &create.image else {
        return Ok(());
    };
    readable_file(
        "create_vm.kernel.kernel_path",
        "kernel",
        &kernel.kernel_path,
        node,
    )?;
    if !kernel.initrd_path.is_empty() {
        if !kernel.initrd_path.starts_with('/') {
            return Err(invalid(
                "create_vm.kernel.initrd_path",
                format!(
                    "`{}` must be an absolute path on the node",
                    kernel.initrd_path
                ),
            ));
        }
        readable_file(
            "create_vm.kernel.initrd_path",
            "initrd",
            &kernel.initrd_path,
            node,
        )?;
    }
    Ok(())
}

/// `path` is a file this process can open for reading.
fn readable_file(field: &str, what: &str, path: &str, node: &str) -> Result<(), Status> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(
                field,
                format!("{what} {path} does not exist on node {node}"),
            ));
        }
        Err(error) => {
            return Err(invalid(
                field,
                format!("{what} {path} cannot be read on node {node}: {error}"),
            ));
        }
    };
    if metadata.is_dir() {
        return Err(invalid(
            field,
            format!("{what} {path} is a directory on node {node}, not a file"),
        ));
    }
    std::fs::File::open(path).map_err(|error| {
        invalid(
            field,
            format!("{what} {path} cannot be read on node {node}: {error}"),
        )
    })?;
    Ok(())
}

/// The fields of a snapshot action (`SnapshotVolume`, `DeleteSnapshot`, `CloneVolume`):
/// volume, snapshot and clone names are DNS labels, and a clone is not its own source.
pub fn snapshot_action(action: &proto::v1::apply_request::Action) -> Result<(), Status> {
    use proto::v1::apply_request::Action;
    match action {
        Action::SnapshotVolume(take) => {
            name("snapshot_volume.volume", &take.volume)?;
            name("snapshot_volume.snapshot", &take.snapshot)
        }
        Action::DeleteSnapshot(delete) => {
            name("delete_snapshot.volume", &delete.volume)?;
            name("delete_snapshot.snapshot", &delete.snapshot)
        }
        Action::CloneVolume(clone) => {
            name("clone_volume.volume", &clone.volume)?;
            name("clone_volume.snapshot", &clone.snapshot)?;
            name("clone_volume.name", &clone.name)?;
            if clone.name == clone.volume {
                return Err(invalid(
                    "clone_volume.name",
                    format!(
                        "`{}` is the source volume; a clone needs a name of its own",
                        clone.name
                    ),
                ));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}
