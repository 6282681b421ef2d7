//! `cairn volume snapshots VM/DISK` and `cairn volume restore VM/DISK --snapshot ID
//! [--as NAME]` (issue 18): the snapshots of a VM disk's volume on every copy, and a
//! restore from one of them. Like `cairn volume export`, requests go straight to the
//! nodes, signed with the controller key of `--data-dir`'s cluster, and every restore
//! is written to the audit log.
//!
//! A restore in place needs the VM stopped (refused with exit 1 while it runs: a disk
//! must not change under a running guest's file system). It clones the snapshot into
//! a private volume on the writer (O(1)), then writes back through the volume's
//! writer every 4 MiB range where the volume differs from the snapshot (so every copy
//! gets it, through the replicated write path), and deletes the private clone: the
//! volume then holds the snapshot's bytes, and every snapshot stays. `--as NAME`
//! clones the snapshot into a new volume NAME (`VM/DISK` names the volume of that
//! disk, so a spec can take it up) and leaves the original alone.

use std::collections::BTreeMap;
use std::path::Path;

use proto::client::NodeClient;
use proto::v1::{self, apply_request::Action};
use reconciler::desired;
use reconciler::pipeline::spec_nodes;
use reconciler::state::StateStore;

use crate::cli::Format;
use crate::commands::{load, runtime};

/// The most a request reads or writes (the node API's limit).
const CHUNK: u64 = 4 << 20;

/// One copy of the volume as its node reports it.
struct Copy {
    node: String,
    status: v1::VolumeStatus,
}

/// Every copy of `volume` on the nodes of the spec that answer, the writer first; the
/// nodes that did not answer.
async fn copies_of(
    nodes: &BTreeMap<String, desired::DesiredNode>,
    signer: &proto::auth::RequestSigner,
    volume: &str,
) -> (Vec<Copy>, Vec<String>) {
    let mut copies = vec![];
    let mut down = vec![];
    for (name, node) in nodes {
        let answer = match NodeClient::connect(&node.address, signer.clone()).await {
            Ok(mut client) => client.observe().await.map_err(|s| s.message().to_owned()),
            Err(e) => Err(e.to_string()),
        };
        match answer {
            Ok(response) => {
                if let Some(status) = response.volumes.into_iter().find(|v| v.name == volume) {
                    copies.push(Copy {
                        node: name.clone(),
                        status,
                    });
                }
            }
            Err(_) => down.push(name.clone()),
        }
    }
    copies.sort_by_key(|c| !is_writer(c));
    (copies, down)
}

fn is_writer(copy: &Copy) -> bool {
    if copy.status.epoch_writer.is_empty() {
        copy.status.role == v1::VolumeRole::Primary as i32
    } else {
        copy.status.epoch_writer == copy.node
    }
}

/// `VM/DISK` → (vm, disk, volume), checked against the specs; `VM/DISK@SITE` names
/// the disk's DR copy at SITE (a site its protection plans replicate to, issue 18);
/// `Err(exit code)` after printing why.
pub(crate) fn resolve(
    model: &compiler::Model,
    target: &str,
) -> Result<(String, String, String), u8> {
    let Some((vm_name, disk_name)) = target.split_once('/') else {
        eprintln!(
            "error: `{target}` is not VM/DISK or VM/DISK@SITE (for example `db/data`, or `db/data@dr` for its DR copy at site dr)"
        );
        return Err(2);
    };
    let (disk_name, site) = match disk_name.split_once('@') {
        Some((disk, site)) => (disk, Some(site)),
        None => (disk_name, None),
    };
    let Some(vm) = model.vm(vm_name) else {
        eprintln!("error: no vm `{vm_name}` in the specs");
        return Err(1);
    };
    if !vm.disks.iter().any(|d| d.name == disk_name) {
        let disks: Vec<&str> = vm.disks.iter().map(|d| d.name.as_str()).collect();
        eprintln!(
            "error: vm `{vm_name}` has no disk `{disk_name}`; its disks: {}",
            if disks.is_empty() {
                "none".to_owned()
            } else {
                disks.join(", ")
            }
        );
        return Err(1);
    }
    if let Some(site) = site {
        let sites: Vec<&str> = model
            .protection_plans
            .iter()
            .filter(|p| vm.protection_plans.contains(&p.name))
            .flat_map(|p| p.replicate.iter().map(|r| r.to_site.as_str()))
            .collect();
        if !sites.contains(&site) {
            eprintln!(
                "error: vm `{vm_name}` has no DR copy at site `{site}`: {}",
                if sites.is_empty() {
                    "no protection plan of it replicates (`replicate to-site=…`)".to_owned()
                } else {
                    format!("its protection plans replicate to {}", sites.join(", "))
                }
            );
            return Err(1);
        }
        return Ok((
            vm_name.to_owned(),
            disk_name.to_owned(),
            compiler::place::dr_volume_name(vm_name, site, disk_name),
        ));
    }
    Ok((
        vm_name.to_owned(),
        disk_name.to_owned(),
        desired::volume_name(vm_name, disk_name),
    ))
}

fn no_copy(volume: &str, down: &[String]) -> u8 {
    eprintln!(
        "error: no node that answered holds volume {volume}{}; `cairn apply` makes it",
        if down.is_empty() {
            String::new()
        } else {
            format!(" (not answering: {})", down.join(", "))
        }
    );
    1
}

/// Unix ms as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc(ms: u64) -> String {
    crate::policy_cmd::rfc3339((ms / 1000) as i64)
}

/// `cairn volume snapshots VM/DISK`: the volume's snapshots, oldest first, with the
/// time the writer took each, its size, the bytes only it holds (what deleting it
/// frees) and the copies that hold it, per site.
pub fn snapshots(
    dir: &Path,
    state: Option<&Path>,
    target: &str,
    format: Format,
) -> anyhow::Result<u8> {
    let loaded = match load(dir, state)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let (vm, disk, volume) = match resolve(loaded.model(), target) {
        Ok(r) => r,
        Err(code) => return Ok(code),
    };
    let nodes = spec_nodes(loaded.model());
    let signer = loaded.ctx.signer()?;
    let rt = runtime()?;
    let (copies, down) = rt.block_on(copies_of(&nodes, &signer, &volume));
    if copies.is_empty() {
        return Ok(no_copy(&volume, &down));
    }
    // The disk's own volume, then its DR copies at the sites its plans replicate to
    // (`VM-DISK-dr-SITE`, issue 18) when one is asked for by `VM/DISK` (not `@SITE`).
    let mut sites = vec![(volume.clone(), target.contains('@'), copies)];
    if !target.contains('@')
        && let Some(m) = loaded.model().vm(&vm)
    {
        let mut dr_sites: Vec<&str> = loaded
            .model()
            .protection_plans
            .iter()
            .filter(|p| m.protection_plans.contains(&p.name))
            .flat_map(|p| p.replicate.iter().map(|r| r.to_site.as_str()))
            .filter(|s| *s != m.site)
            .collect();
        dr_sites.dedup();
        for site in dr_sites {
            let dr = compiler::place::dr_volume_name(&vm, site, &disk);
            let (dr_copies, _) = rt.block_on(copies_of(&nodes, &signer, &dr));
            if !dr_copies.is_empty() {
                sites.push((dr, true, dr_copies));
            }
        }
    }
    let site_of = |copies: &[Copy]| {
        copies
            .first()
            .and_then(|w| nodes.get(&w.node))
            .map(|n| n.site.clone())
            .unwrap_or_default()
    };
    let rows_of = |copies: &[Copy]| -> Vec<v1::SnapshotStatus> {
        let mut rows: Vec<v1::SnapshotStatus> = copies
            .first()
            .map(|w| w.status.snapshots.clone())
            .unwrap_or_default();
        rows.sort_by_key(|s| (s.created_at_unix_ms, s.name.clone()));
        rows
    };
    let holders = |copies: &[Copy], name: &str| -> Vec<String> {
        copies
            .iter()
            .filter(|c| c.status.snapshots.iter().any(|s| s.name == name))
            .map(|c| c.node.clone())
            .collect()
    };
    if matches!(format, Format::Json) {
        let sites: Vec<serde_json::Value> = sites
            .iter()
            .map(|(name, dr_copy, copies)| {
                let snapshots: Vec<serde_json::Value> = rows_of(copies)
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "name": s.name,
                            "created_at_unix_ms": s.created_at_unix_ms,
                            "size_bytes": s.size_bytes,
                            "unique_bytes": s.unique_bytes,
                            "scheduled": s.name.starts_with(reconciler::observe::SCHEDULED_SNAPSHOT_PREFIX),
                            "copies": holders(copies, &s.name),
                            "pending_copies": s.pending_copies,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "site": site_of(copies),
                    "volume": name,
                    "dr_copy": dr_copy,
                    "writer": copies.first().map(|w| w.node.clone()).unwrap_or_default(),
                    "snapshots": snapshots,
                })
            })
            .collect();
        let out = serde_json::json!({
            "format_version": 1,
            "vm": vm,
            "disk": disk,
            "volume": volume,
            "sites": sites,
            "unreachable": down,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    let human = compiler::units::human_size;
    for (name, dr_copy, copies) in &sites {
        let rows = rows_of(copies);
        println!(
            "{} {name} (vm {vm}, disk {disk}), site {}: {} snapshot(s), writer {}",
            if *dr_copy { "DR copy" } else { "volume" },
            site_of(copies),
            rows.len(),
            copies.first().map(|w| w.node.as_str()).unwrap_or_default()
        );
        for s in &rows {
            let pending = if s.pending_copies.is_empty() {
                String::new()
            } else {
                format!(", not yet on {}", s.pending_copies.join(" "))
            };
            println!(
                "  {:<22} {}  size {:>8}  unique {:>8}  on {}{pending}",
                s.name,
                utc(s.created_at_unix_ms),
                human(s.size_bytes),
                human(s.unique_bytes),
                holders(copies, &s.name).join(" ")
            );
        }
    }
    if !down.is_empty() {
        eprintln!("not answering: {}", down.join(", "));
    }
    Ok(0)
}

/// What a restore does.
#[derive(Debug)]
pub struct RestoreArgs<'a> {
    /// `VM/DISK`.
    pub target: &'a str,
    /// The snapshot.
    pub snapshot: &'a str,
    /// A new volume (`VM/DISK` or a volume name) instead of in place.
    pub into: Option<&'a str>,
}

/// `cairn volume restore VM/DISK --snapshot ID [--as NAME]` (see the module docs).
pub fn restore(dir: &Path, state: Option<&Path>, args: &RestoreArgs<'_>) -> anyhow::Result<u8> {
    let loaded = match load(dir, state)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let (vm, _, volume) = match resolve(loaded.model(), args.target) {
        Ok(r) => r,
        Err(code) => return Ok(code),
    };
    let nodes = spec_nodes(loaded.model());
    let signer = loaded.ctx.signer()?;
    let store = loaded.ctx.store()?;
    let rt = runtime()?;
    let (copies, down) = rt.block_on(copies_of(&nodes, &signer, &volume));
    let Some(writer) = copies.first() else {
        return Ok(no_copy(&volume, &down));
    };
    let new_name = args.into.map(|name| match name.split_once('/') {
        Some((v, d)) => desired::volume_name(v, d),
        None => name.to_owned(),
    });
    if new_name.is_none() {
        // In place: never under a running guest.
        let running = rt.block_on(running_on(&nodes, &signer, &vm));
        if let Some(on) = running {
            eprintln!(
                "error: vm `{vm}` is running on node {on}; a restore in place changes its disk under its file system. stop it first, or restore into a new volume with `--as NAME` (`--as VM/DISK` names a disk's volume)"
            );
            return Ok(1);
        }
    }
    let Some(snapshot) = writer
        .status
        .snapshots
        .iter()
        .find(|s| s.name == args.snapshot)
    else {
        let names: Vec<&str> = writer
            .status
            .snapshots
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        eprintln!(
            "error: volume {volume} has no snapshot `{}` on its writer {}; its snapshots: {} (`cairn volume snapshots {}` lists them)",
            args.snapshot,
            writer.node,
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            },
            args.target
        );
        return Ok(1);
    };
    let address = nodes[&writer.node].address.clone();
    let node = writer.node.clone();
    let created_at = snapshot.created_at_unix_ms;
    let result = rt.block_on(async {
        let mut client = NodeClient::connect(&address, signer.clone()).await?;
        let clone_name = new_name
            .clone()
            .unwrap_or_else(|| format!("restore-{}", reconciler::state::random_id()));
        let id = |what: &str| format!("restore-{what}-{}", reconciler::state::random_id());
        client
            .apply(v1::ApplyRequest {
                request_id: id("clone"),
                action: Some(Action::CloneVolume(v1::CloneVolume {
                    volume: volume.clone(),
                    snapshot: args.snapshot.to_owned(),
                    name: clone_name.clone(),
                })),
            })
            .await?;
        if new_name.is_some() {
            return anyhow::Ok((0u64, 0u64));
        }
        let size = writer.status.size_bytes.min(snapshot.size_bytes);
        let (mut compared, mut written) = (0u64, 0u64);
        let mut offset = 0;
        while offset < size {
            let length = CHUNK.min(size - offset);
            let want = client
                .read_volume(v1::ReadVolumeRequest {
                    name: clone_name.clone(),
                    offset,
                    length,
                })
                .await?;
            let have = client
                .read_volume(v1::ReadVolumeRequest {
                    name: volume.clone(),
                    offset,
                    length,
                })
                .await?;
            compared += length;
            if want != have {
                client
                    .apply(v1::ApplyRequest {
                        request_id: id("write"),
                        action: Some(Action::WriteVolume(v1::WriteVolume {
                            name: volume.clone(),
                            offset,
                            data: want,
                        })),
                    })
                    .await?;
                written += length;
            }
            offset += length;
        }
        client
            .apply(v1::ApplyRequest {
                request_id: id("drop"),
                action: Some(Action::DeleteVolume(v1::DeleteVolume { name: clone_name })),
            })
            .await?;
        anyhow::Ok((compared, written))
    });
    let (compared, written) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "error: restoring {volume} from {} on node {node}: {e:#}",
                args.snapshot
            );
            return Ok(1);
        }
    };
    store.audit(
        "volume-restore",
        serde_json::json!({"volume": volume, "snapshot": args.snapshot, "snapshot_created_at_unix_ms": created_at, "node": node, "as": new_name, "bytes_written": written}),
    )?;
    let human = compiler::units::human_size;
    match &new_name {
        Some(name) => println!(
            "restored {volume}@{} (taken {}) as new volume {name} on node {node} and its copies",
            args.snapshot,
            utc(created_at)
        ),
        None => println!(
            "restored {volume} in place to {} (taken {}) on node {node}: {} compared, {} written back through the writer",
            args.snapshot,
            utc(created_at),
            human(compared),
            human(written)
        ),
    }
    Ok(0)
}

/// The node where `vm` runs, if it runs.
async fn running_on(
    nodes: &BTreeMap<String, desired::DesiredNode>,
    signer: &proto::auth::RequestSigner,
    vm: &str,
) -> Option<String> {
    for (name, node) in nodes {
        let Ok(mut client) = NodeClient::connect(&node.address, signer.clone()).await else {
            continue;
        };
        let Ok(response) = client.observe().await else {
            continue;
        };
        if response
            .vms
            .iter()
            .any(|v| v.name == vm && v.state == v1::VmState::Running as i32)
        {
            return Some(name.clone());
        }
    }
    None
}
