//! `cairn failover --site SITE` (without `--drill`) and `cairn failback --site SITE`
//! (issue 18): a real failover of a lost site to its DR site, and the way back.
//!
//! **Failover.** Refused while any node of SITE answers (a site that runs is not
//! lost; `--drill` tests the DR site without touching it). For every VM of SITE a
//! protection plan replicates, at its DR site, on the node that writes its DR
//! copies:
//! 1. *fence*: each DR copy stops accepting deltas (`AcceptReplication` with no
//!    source), so a node of SITE that returns can no longer write into it;
//! 2. a DR copy caught in the middle of a delta (its progress mark past 0) is put
//!    back to its newest committed snapshot, the latest consistent replicated point
//!    (compared and written back through the writer);
//! 3. the failover is recorded in the placement (`Placement::failovers`, with the
//!    site's next epoch): from then on the desired state has the VM on the DR node
//!    with its DR copies as disks, and any plan deletes, never starts or moves, the
//!    copy of the VM a returning node of SITE still holds (`reconciler::desired::failover`);
//! 4. the VM is defined there with its DR copies (no NICs: the mapping of networks
//!    to the DR site is not built) and started, unless the specs power it off;
//!    the command waits until it runs and is healthy.
//!
//! It prints, per VM, the point in time it came back from and how long after the
//! command started it ran healthy (the RTO), and audits `failover`.
//!
//! **Failback.** Refused unless SITE is failed over and every node its VMs go back
//! to answers. Per VM: its copy at SITE is deleted if a node still holds it; each
//! source volume at SITE stops its schedules (snapshots, shipping), drops the
//! snapshots taken after the one the VM failed over from, and is put back to that
//! snapshot (the bytes SITE wrote after it are discarded, counted and printed: they
//! never mix in); the VM stops at the DR site; each DR copy takes a snapshot, and
//! ships it back to its source volume as a delta from the common snapshot (the
//! source accepts it only from that node, and the manifests are compared at the
//! commit); the failover record is closed, and the VM is defined and started at
//! SITE again. Its copy at the DR site is deleted, the DR copies stay (the base of
//! the next delta). `cairn apply` then sets the replication to the DR site up again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proto::client::NodeClient;
use proto::v1;
use reconciler::desired;
use reconciler::observe::{NodeObservation, Observed};
use reconciler::plan::{NodeAction, PeerRef};
use reconciler::state::StateStore;

use crate::commands::{Loaded, runtime};

const CHUNK: u64 = 4 << 20;

fn id(what: &str) -> String {
    format!("failover-{what}-{}", reconciler::state::random_id())
}

/// The nodes of `site` that answered.
fn answering<'o>(model: &compiler::Model, observed: &'o Observed, site: &str) -> Vec<&'o String> {
    observed
        .nodes
        .iter()
        .filter(|(n, o)| {
            matches!(o, NodeObservation::Reachable { .. })
                && model
                    .site(site)
                    .is_some_and(|s| s.nodes.iter().any(|m| m.name == **n))
        })
        .map(|(n, _)| n)
        .collect()
}

fn public_key(observed: &Observed, node: &str) -> String {
    match observed.nodes.get(node) {
        Some(NodeObservation::Reachable { public_key_hex, .. }) => public_key_hex.clone(),
        _ => String::new(),
    }
}

/// Waits until `vm` runs and is healthy on the node behind `client`.
async fn healthy(client: &mut NodeClient, vm: &str, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let answer = client.observe().await?;
        let (state, health) = answer
            .vms
            .iter()
            .find(|v| v.name == vm)
            .map_or((0, 0), |v| (v.state, v.health));
        if state == v1::VmState::Running as i32 && health == v1::Health::Healthy as i32 {
            return Ok(());
        }
        if started.elapsed() > limit {
            anyhow::bail!(
                "{vm} was not running and healthy within {} s (state {}, health {})",
                limit.as_secs(),
                v1::VmState::try_from(state).map_or("unknown", |s| s.status_name()),
                v1::Health::try_from(health).map_or("unknown", |h| h.status_name()),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Puts `volume` back to `snapshot` (a clone of it, compared piece by piece, the
/// differing pieces written back through the writer): the bytes of the 4 KiB blocks
/// that differed.
async fn revert(
    client: &mut NodeClient,
    volume: &str,
    snapshot: &str,
    size: u64,
) -> anyhow::Result<u64> {
    let clone = format!("revert-{}", reconciler::state::random_id());
    client
        .apply(
            NodeAction::CloneVolume {
                volume: volume.to_owned(),
                snapshot: snapshot.to_owned(),
                name: clone.clone(),
            }
            .to_request(&id("clone")),
        )
        .await?;
    let mut written = 0;
    let mut offset = 0;
    while offset < size {
        let length = CHUNK.min(size - offset);
        let read = |name: &str| v1::ReadVolumeRequest {
            name: name.to_owned(),
            offset,
            length,
        };
        let want = client.read_volume(read(&clone)).await?;
        let have = client.read_volume(read(volume)).await?;
        if want != have {
            let differing = want
                .chunks(4096)
                .zip(have.chunks(4096))
                .filter(|(w, h)| w != h)
                .count() as u64;
            written += differing * 4096;
            client
                .apply(v1::ApplyRequest {
                    request_id: id("write"),
                    action: Some(v1::apply_request::Action::WriteVolume(v1::WriteVolume {
                        name: volume.to_owned(),
                        offset,
                        data: want,
                    })),
                })
                .await?;
        }
        offset += length;
    }
    client
        .apply(NodeAction::DeleteVolume { name: clone }.to_request(&id("drop")))
        .await?;
    Ok(written)
}

/// Stops and deletes `vm` on the node behind `client`; one that is not there is fine.
async fn remove_vm(client: &mut NodeClient, vm: &str) -> anyhow::Result<()> {
    let _ = client
        .apply(
            NodeAction::StopVm {
                name: vm.to_owned(),
            }
            .to_request(&id("stop")),
        )
        .await;
    if let Err(e) = client
        .apply(
            NodeAction::DeleteVm {
                name: vm.to_owned(),
            }
            .to_request(&id("delete")),
        )
        .await
        && !e.message().contains("not found")
        && !e.message().contains("no such")
        && !e.message().contains("no vm")
    {
        anyhow::bail!("delete vm {vm}: {}", e.message());
    }
    Ok(())
}

/// Defines `vm` as `desired` has it (unless the node holds it) and starts it unless
/// it is powered off; waits until it runs healthy.
async fn start(
    client: &mut NodeClient,
    desired: &desired::Desired,
    vm: &str,
    limit: Duration,
) -> anyhow::Result<bool> {
    let d = &desired.vms[vm];
    let have = client.observe().await?;
    if !have.vms.iter().any(|v| v.name == vm) {
        client
            .apply(reconciler::plan::vm_definition_of(d, desired).to_request(&id("create")))
            .await?;
    }
    if d.power_off {
        return Ok(false);
    }
    client
        .apply(
            NodeAction::StartVm {
                name: vm.to_owned(),
            }
            .to_request(&id("start")),
        )
        .await?;
    healthy(client, vm, limit).await?;
    Ok(true)
}

/// `cairn failover --site SITE`: the exit code.
pub fn failover(loaded: &Loaded, site: &str, limit: Duration) -> anyhow::Result<u8> {
    let began = Instant::now();
    let store = loaded.ctx.store()?;
    let (lock, _) = store.lock("cairn failover")?;
    let result = failover_locked(loaded, &store, site, limit, began);
    store.unlock(&lock.id)?;
    result
}

fn failover_locked(
    loaded: &Loaded,
    store: &dyn StateStore,
    site: &str,
    limit: Duration,
    began: Instant,
) -> anyhow::Result<u8> {
    let model = loaded.model();
    let mut placement = match store.placement()? {
        Some(p) => p,
        None => desired::place(model, None),
    };
    if let Some(f) = placement.failover_of(site) {
        eprintln!(
            "error: site {site} failed over to {} already (epoch {}); `cairn failback --site {site}` brings it back",
            f.to_site, f.epoch
        );
        return Ok(1);
    }
    let signer = loaded.ctx.signer()?;
    let api = reconciler::nodes::GrpcNodes::new(signer.clone());
    let spec = reconciler::pipeline::spec_nodes(model);
    let rt = runtime()?;
    let observed = rt.block_on(reconciler::observe::observe(&spec, &api));
    let up = answering(model, &observed, site);
    if !up.is_empty() {
        eprintln!(
            "error: site {site} is not lost: {} answered; a failover starts its VMs elsewhere, so it is refused while the site runs (`cairn failover --site {site} --drill` tests the DR site without touching it)",
            up.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ")
        );
        return Ok(1);
    }
    let current = desired::desired(
        model,
        &loaded.ctx.spec_root,
        desired::place(model, Some(&placement)),
    );
    let mut to_site: Option<String> = None;
    let mut vms = vec![];
    let mut failed = vec![];
    for (vm, dr_site) in crate::failover::replicated_vms(model, site) {
        if to_site.as_ref().is_some_and(|t| *t != dr_site) {
            failed.push(format!(
                "{}: it replicates to {dr_site}, the others to {}; one failover goes to one site",
                vm.name,
                to_site.as_deref().unwrap_or_default()
            ));
            continue;
        }
        match crate::failover::prepare(&current, &observed, vm, &dr_site) {
            Ok(source) => {
                to_site = Some(dr_site);
                vms.push((vm, source));
            }
            Err(why) => failed.push(format!("{}: {why}", vm.name)),
        }
    }
    for f in &failed {
        eprintln!("error: vm {f}");
    }
    let Some(to_site) = to_site else {
        eprintln!("error: no VM of site {site} can fail over");
        return Ok(1);
    };
    // 1-2: fence the DR copies and put a half-received delta back.
    let mut records = vec![];
    for (vm, source) in &vms {
        let address = spec[&source.node].address.clone();
        let fenced = rt.block_on(async {
            let mut client = NodeClient::connect(&address, signer.clone()).await?;
            let mut reverted = 0;
            for (dr, _) in &source.clones {
                client
                    .apply(v1::ApplyRequest {
                        request_id: id("fence"),
                        action: Some(v1::apply_request::Action::AcceptReplication(
                            v1::AcceptReplication {
                                volume: dr.clone(),
                                source: None,
                            },
                        )),
                    })
                    .await?;
                let partial = match observed.nodes.get(&source.node) {
                    Some(NodeObservation::Reachable { replications, .. }) => replications
                        .get(dr)
                        .is_some_and(|r| !r.in_transfer.is_empty() && r.transferred_to > 0),
                    _ => false,
                };
                if partial {
                    let size = current.volumes.get(dr).map_or(0, |v| v.size_bytes);
                    reverted += revert(&mut client, dr, &source.snapshot, size).await?;
                }
            }
            anyhow::Ok(reverted)
        });
        match fenced {
            Ok(reverted) => {
                if reverted > 0 {
                    println!(
                        "{}: a delta was half received; its DR copies were put back to {} ({} of 4 KiB blocks that differed)",
                        vm.name,
                        source.snapshot,
                        compiler::units::human_size(reverted)
                    );
                }
                records.push(compiler::place::FailedOverVm {
                    name: vm.name.clone(),
                    node: source.node.clone(),
                    volumes: source.clones.iter().map(|(dr, _)| dr.clone()).collect(),
                    snapshot: source.snapshot.clone(),
                    snapshot_at_unix_ms: source.at_unix_ms,
                });
            }
            Err(e) => {
                eprintln!("error: vm {}: on {}: {e:#}", vm.name, source.node);
                failed.push(vm.name.clone());
            }
        }
    }
    if records.is_empty() {
        return Ok(1);
    }
    // 3: the record, the site's next epoch.
    let epoch = placement.site_epoch(site) + 1;
    let at = reconciler::state::now_ms();
    placement.failovers.push(compiler::place::SiteFailover {
        site: site.to_owned(),
        to_site: to_site.clone(),
        epoch,
        at_unix_ms: at,
        failed_back_at_unix_ms: None,
        vms: records.clone(),
    });
    store.set_placement(&placement)?;
    // 4: start them at the DR site.
    let desired = desired::desired(
        model,
        &loaded.ctx.spec_root,
        desired::place(model, Some(&placement)),
    );
    let mut report = vec![];
    for r in &records {
        let address = spec[&r.node].address.clone();
        let started = rt.block_on(async {
            let mut client = NodeClient::connect(&address, signer.clone()).await?;
            start(&mut client, &desired, &r.name, limit).await
        });
        let rto_ms = began.elapsed().as_millis() as u64;
        let age_ms = at.saturating_sub(r.snapshot_at_unix_ms);
        match started {
            Ok(running) => {
                println!(
                    "failover {}: site {site} -> {to_site} (epoch {epoch}): {} on {} from {} (taken {age_ms} ms before the failover){}",
                    r.name,
                    if running {
                        "running and healthy"
                    } else {
                        "defined (powered off)"
                    },
                    r.node,
                    r.snapshot,
                    if running {
                        format!(", {rto_ms} ms after the command started")
                    } else {
                        String::new()
                    }
                );
                report.push(serde_json::json!({"vm": r.name, "node": r.node, "snapshot": r.snapshot, "snapshot_at_unix_ms": r.snapshot_at_unix_ms, "running": running, "rto_ms": rto_ms}));
            }
            Err(e) => {
                eprintln!(
                    "error: vm {} on {}: {e:#} (the failover is recorded: `cairn apply` starts it there)",
                    r.name, r.node
                );
                failed.push(r.name.clone());
            }
        }
    }
    store.audit(
        "failover",
        serde_json::json!({"site": site, "to_site": to_site, "epoch": epoch, "vms": report}),
    )?;
    Ok(if failed.is_empty() { 0 } else { 1 })
}

/// `cairn failback --site SITE`: the exit code.
pub fn failback(loaded: &Loaded, site: &str, limit: Duration) -> anyhow::Result<u8> {
    let store = loaded.ctx.store()?;
    let (lock, _) = store.lock("cairn failback")?;
    let result = failback_locked(loaded, &store, site, limit);
    store.unlock(&lock.id)?;
    result
}

/// What one VM's failback did.
#[derive(serde::Serialize)]
struct Back {
    vm: String,
    node: String,
    /// The common snapshot the delta was shipped from.
    base: String,
    /// The DR site's snapshot shipped back.
    snapshot: String,
    /// Bytes SITE wrote after `base`, discarded.
    discarded_bytes: u64,
    data_bytes: u64,
    zero_bytes: u64,
    wire_bytes: u64,
    ship_ms: u64,
    /// From the VM's stop at the DR site to it running healthy at SITE.
    downtime_ms: u64,
}

fn failback_locked(
    loaded: &Loaded,
    store: &dyn StateStore,
    site: &str,
    limit: Duration,
) -> anyhow::Result<u8> {
    let model = loaded.model();
    let Some(mut placement) = store.placement()? else {
        eprintln!("error: site {site} is not failed over (no placement is recorded)");
        return Ok(1);
    };
    let Some(record) = placement.failover_of(site).cloned() else {
        eprintln!("error: site {site} is not failed over; nothing to fail back");
        return Ok(1);
    };
    // Where the VMs go back to: the desired state without the failover.
    let mut back = placement.clone();
    for f in back.failovers.iter_mut() {
        if f.site == site {
            f.failed_back_at_unix_ms.get_or_insert(0);
        }
    }
    let home = desired::desired(
        model,
        &loaded.ctx.spec_root,
        desired::place(model, Some(&back)),
    );
    let signer = loaded.ctx.signer()?;
    let api = reconciler::nodes::GrpcNodes::new(signer.clone());
    let spec = reconciler::pipeline::spec_nodes(model);
    let rt = runtime()?;
    let observed = rt.block_on(reconciler::observe::observe(&spec, &api));
    let mut plans = vec![];
    for r in &record.vms {
        let Some(vm) = home.vms.get(&r.name) else {
            eprintln!(
                "error: vm {} has no node at site {site} (not placed); it stays at {}",
                r.name, record.to_site
            );
            return Ok(1);
        };
        let sources: Vec<&desired::DesiredVolume> = vm
            .volumes
            .iter()
            .filter_map(|v| home.volumes.get(v))
            .collect();
        if sources.len() != r.volumes.len() {
            eprintln!(
                "error: vm {}: its disks at site {site} ({}) do not match its DR copies ({})",
                r.name,
                vm.volumes.join(", "),
                r.volumes.join(", ")
            );
            return Ok(1);
        }
        for node in sources.iter().map(|s| &s.node).chain([&vm.node]) {
            if !observed.reachable(node) {
                eprintln!(
                    "error: node {node} of site {site} does not answer; vm {} goes back there, so the failback waits for it",
                    r.name
                );
                return Ok(1);
            }
        }
        plans.push((r, vm, sources));
    }
    let mut backs = vec![];
    for (r, vm, sources) in plans {
        let dr_address = spec[&r.node].address.clone();
        let outcome = rt.block_on(async {
            let mut dr = NodeClient::connect(&dr_address, signer.clone()).await?;
            let mut mine = BTreeMap::new();
            for source in &sources {
                if !mine.contains_key(&source.node) {
                    let address = spec[&source.node].address.clone();
                    mine.insert(
                        source.node.clone(),
                        NodeClient::connect(&address, signer.clone()).await?,
                    );
                }
            }
            // The copy SITE may still hold goes (its disks stay).
            for node in observed.nodes.keys() {
                if spec.get(node).is_some_and(|n| n.site == site)
                    && observed.reachable(node)
                {
                    let address = spec[node].address.clone();
                    let mut c = NodeClient::connect(&address, signer.clone()).await?;
                    let held = c.observe().await?.vms.iter().any(|v| v.name == r.name);
                    if held {
                        remove_vm(&mut c, &r.name).await?;
                    }
                }
            }
            // Each source volume: no schedules, back to the common snapshot.
            let mut discarded = 0;
            for (source, dr_copy) in sources.iter().zip(&r.volumes) {
                let client = mine.get_mut(&source.node).expect("connected");
                client
                    .apply(
                        NodeAction::SetProtection {
                            vm: r.name.clone(),
                            plan: String::new(),
                            volumes: vec![],
                            every_ms: 0,
                            keep: 1,
                        }
                        .to_request(&id("unschedule")),
                    )
                    .await?;
                client
                    .apply(
                        NodeAction::ReplicateVolume {
                            volume: source.name.clone(),
                            target: PeerRef {
                                name: r.node.clone(),
                                address: dr_address.clone(),
                                public_key_hex: public_key(&observed, &r.node),
                            },
                            target_volume: dr_copy.clone(),
                            every_ms: 0,
                            keep: 1,
                        }
                        .to_request(&id("unship")),
                    )
                    .await?;
                let status = client.observe().await?;
                let Some(volume) = status.volumes.iter().find(|v| v.name == source.name) else {
                    anyhow::bail!("node {} holds no volume {}", source.node, source.name);
                };
                if !volume.snapshots.iter().any(|s| s.name == r.snapshot) {
                    anyhow::bail!(
                        "volume {} on {} no longer holds {}, the snapshot {} failed over from; without a common snapshot only a whole copy could go back, which this failback does not do",
                        source.name,
                        source.node,
                        r.snapshot,
                        r.name
                    );
                }
                for later in volume
                    .snapshots
                    .iter()
                    .filter(|s| s.created_at_unix_ms > r.snapshot_at_unix_ms)
                {
                    client
                        .apply(
                            NodeAction::DeleteSnapshot {
                                volume: source.name.clone(),
                                snapshot: later.name.clone(),
                            }
                            .to_request(&id("unsnap")),
                        )
                        .await?;
                }
                discarded += revert(client, &source.name, &r.snapshot, source.size_bytes).await?;
            }
            // The DR site: stop, snapshot, ship back.
            let stopped_at = Instant::now();
            let _ = dr
                .apply(NodeAction::StopVm { name: r.name.clone() }.to_request(&id("stop")))
                .await;
            let snapshot = format!("failback-{}", reconciler::state::now_ms());
            let (mut data, mut zero, mut wire, mut ship_ms) = (0, 0, 0, 0);
            let mut base = String::new();
            for (source, dr_copy) in sources.iter().zip(&r.volumes) {
                dr.apply(
                    NodeAction::SnapshotVolume {
                        volume: dr_copy.clone(),
                        snapshot: snapshot.clone(),
                    }
                    .to_request(&id("snap")),
                )
                .await?;
                let client = mine.get_mut(&source.node).expect("connected");
                client
                    .apply(
                        NodeAction::AcceptReplication {
                            volume: source.name.clone(),
                            source: PeerRef {
                                name: r.node.clone(),
                                address: dr_address.clone(),
                                public_key_hex: public_key(&observed, &r.node),
                            },
                        }
                        .to_request(&id("accept")),
                    )
                    .await?;
                let target = v1::Peer {
                    name: source.node.clone(),
                    address: spec[&source.node].address.clone(),
                    public_key_hex: public_key(&observed, &source.node),
                };
                let shipped = dr
                    .apply(v1::ApplyRequest {
                        request_id: id("ship"),
                        action: Some(v1::apply_request::Action::ReplicateVolume(
                            v1::ReplicateVolume {
                                volume: dr_copy.clone(),
                                target: Some(target.clone()),
                                target_volume: source.name.clone(),
                                every_ms: 0,
                                keep: 3,
                                now: true,
                            },
                        )),
                    })
                    .await?;
                let Some(v1::apply_response::Result::Replication(result)) = shipped.result
                else {
                    anyhow::bail!("{dr_copy}: the node answered without a replication result");
                };
                if result.snapshot != snapshot {
                    anyhow::bail!(
                        "{dr_copy}: shipped {} instead of {snapshot}",
                        result.snapshot
                    );
                }
                base = result.base.clone();
                data += result.data_bytes;
                zero += result.zero_bytes;
                wire += result.wire_bytes;
                ship_ms += result.duration_ms;
                // The one-off shipping and the acceptance end here; `cairn apply`
                // sets the replication to the DR site up again.
                dr.apply(v1::ApplyRequest {
                    request_id: id("unship"),
                    action: Some(v1::apply_request::Action::ReplicateVolume(
                        v1::ReplicateVolume {
                            volume: dr_copy.clone(),
                            target: Some(target),
                            target_volume: source.name.clone(),
                            every_ms: 0,
                            keep: 3,
                            now: false,
                        },
                    )),
                })
                .await?;
                client
                    .apply(v1::ApplyRequest {
                        request_id: id("unaccept"),
                        action: Some(v1::apply_request::Action::AcceptReplication(
                            v1::AcceptReplication {
                                volume: source.name.clone(),
                                source: None,
                            },
                        )),
                    })
                    .await?;
            }
            remove_vm(&mut dr, &r.name).await?;
            anyhow::Ok((stopped_at, snapshot, base, discarded, data, zero, wire, ship_ms))
        });
        let (stopped_at, snapshot, base, discarded, data, zero, wire, ship_ms) = match outcome {
            Ok(o) => o,
            Err(e) => {
                eprintln!(
                    "error: failback of vm {}: {e:#} (the failover stays recorded; run `cairn failback --site {site}` again)",
                    r.name
                );
                return Ok(1);
            }
        };
        backs.push((
            r, vm, stopped_at, snapshot, base, discarded, data, zero, wire, ship_ms,
        ));
    }
    // The record closes: the VMs belong to SITE again.
    let now = reconciler::state::now_ms();
    for f in placement.failovers.iter_mut() {
        if f.site == site && f.epoch == record.epoch {
            f.failed_back_at_unix_ms = Some(now);
        }
    }
    store.set_placement(&placement)?;
    let mut report = vec![];
    let mut failed = false;
    for (r, vm, stopped_at, snapshot, base, discarded, data, zero, wire, ship_ms) in backs {
        let address = spec[&vm.node].address.clone();
        let started = rt.block_on(async {
            let mut client = NodeClient::connect(&address, signer.clone()).await?;
            start(&mut client, &home, &r.name, limit).await
        });
        let downtime_ms = stopped_at.elapsed().as_millis() as u64;
        let human = compiler::units::human_size;
        match started {
            Ok(running) => println!(
                "failback {}: site {} -> {site} (epoch {}): {} on {} from {snapshot}, shipped as a delta from {base}: {} data + {} zeros ({} on the wire) in {ship_ms} ms; {} written at {site} after {base} discarded{}",
                r.name,
                record.to_site,
                record.epoch,
                if running {
                    "running and healthy"
                } else {
                    "defined (powered off)"
                },
                vm.node,
                human(data),
                human(zero),
                human(wire),
                human(discarded),
                if running {
                    format!("; down {downtime_ms} ms")
                } else {
                    String::new()
                }
            ),
            Err(e) => {
                failed = true;
                eprintln!(
                    "error: vm {} on {}: {e:#} (`cairn apply` starts it)",
                    r.name, vm.node
                );
            }
        }
        report.push(Back {
            vm: r.name.clone(),
            node: vm.node.clone(),
            base,
            snapshot,
            discarded_bytes: discarded,
            data_bytes: data,
            zero_bytes: zero,
            wire_bytes: wire,
            ship_ms,
            downtime_ms,
        });
    }
    println!(
        "`cairn apply` sets the replication to {} up again",
        record.to_site
    );
    store.audit(
        "failback",
        serde_json::json!({"site": site, "from_site": record.to_site, "epoch": record.epoch, "vms": report}),
    )?;
    Ok(u8::from(failed))
}
