//! `cairn failover --site SITE --drill` (issue 18): a restore drill of every VM of
//! SITE that a protection plan replicates to another site. For each such VM, at its
//! DR site: each disk's DR copy's newest replicated snapshot is cloned (O(1),
//! `VM-DISK-drill`), a VM `VM-drill` with the VM's definition but no NIC (it cannot
//! reach the production networks) is defined on the DR copy's writer with those
//! clones as its disks and started; the drill passes when the node reports it
//! running and healthy (the guest's heartbeat) within the limit, and says how long
//! that took and which point in time it came back from. Then everything it made is
//! removed, pass or fail. Nothing at SITE is touched: the source VM, its volumes,
//! snapshots and replications stay as they are. Signed with the cluster's controller
//! key like `cairn volume restore`, and audited (`failover-drill`).
//!
//! Without `--drill` it is a real failover of a lost site (`crate::site_failover`).

use std::path::Path;
use std::time::{Duration, Instant};

use proto::client::NodeClient;
use proto::v1;
use reconciler::desired;
use reconciler::observe::{NodeObservation, Observed};
use reconciler::pipeline::spec_nodes;
use reconciler::plan::NodeAction;
use reconciler::state::StateStore;

use crate::commands::{load, runtime};

/// One VM's drill, as printed and audited.
#[derive(Debug, serde::Serialize)]
struct Drill {
    vm: String,
    site: String,
    node: String,
    snapshot: String,
    /// When the source took the snapshot (Unix ms; 0: unknown).
    snapshot_at_unix_ms: u64,
    passed: bool,
    /// From the first clone to the VM reported running and healthy.
    restore_ms: u64,
    detail: String,
}

/// `cairn failover --site SITE [--drill]`; returns the exit code.
pub fn failover(
    dir: &Path,
    state: Option<&Path>,
    site: &str,
    drill: bool,
    limit: Duration,
) -> anyhow::Result<u8> {
    let loaded = match load(dir, state)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let model = loaded.model();
    if model.site(site).is_none() {
        let sites: Vec<&str> = model.sites.iter().map(|s| s.name.as_str()).collect();
        eprintln!(
            "error: no site `{site}` in the specs; its sites: {}",
            sites.join(", ")
        );
        return Ok(1);
    }
    if !drill {
        return crate::site_failover::failover(&loaded, site, limit);
    }
    let targets = replicated_vms(model, site);
    if targets.is_empty() {
        eprintln!(
            "error: no VM of site {site} is replicated to another site (a protection plan's `replicate to-site=…`)"
        );
        return Ok(1);
    }
    let store = loaded.ctx.store()?;
    let placement = desired::place(model, store.placement()?.as_ref());
    let desired = desired::desired(model, &loaded.ctx.spec_root, placement);
    let spec = spec_nodes(model);
    let signer = loaded.ctx.signer()?;
    let api = reconciler::nodes::GrpcNodes::new(signer.clone());
    let rt = runtime()?;
    let observed = rt.block_on(reconciler::observe::observe(&spec, &api));
    let mut drills = vec![];
    for (vm, dr_site) in targets {
        let drill = match prepare(&desired, &observed, vm, &dr_site) {
            Ok(DrillSource {
                node,
                snapshot,
                at_unix_ms: at,
                clones,
            }) => {
                let address = spec[&node].address.clone();
                let (passed, restore_ms, detail) = rt
                    .block_on(run(
                        &signer, &desired, vm, &node, &address, &snapshot, &clones, limit,
                    ))
                    .unwrap_or_else(|e| (false, 0, format!("on {node}: {e}")));
                Drill {
                    vm: vm.name.clone(),
                    site: dr_site.clone(),
                    node,
                    snapshot,
                    snapshot_at_unix_ms: at,
                    passed,
                    restore_ms,
                    detail,
                }
            }
            Err(why) => Drill {
                vm: vm.name.clone(),
                site: dr_site.clone(),
                node: String::new(),
                snapshot: String::new(),
                snapshot_at_unix_ms: 0,
                passed: false,
                restore_ms: 0,
                detail: why,
            },
        };
        let age = if drill.snapshot_at_unix_ms == 0 {
            String::new()
        } else {
            let ms = reconciler::state::now_ms().saturating_sub(drill.snapshot_at_unix_ms);
            if ms < 60_000 {
                format!(", taken {ms} ms before the drill")
            } else {
                format!(
                    ", taken {} before the drill",
                    compiler::units::format_duration(ms / 1000 * 1000)
                )
            }
        };
        if drill.passed {
            println!(
                "drill {} at site {}: pass: booted on {} from {}{age}, running and healthy in {} ms; removed again",
                drill.vm, drill.site, drill.node, drill.snapshot, drill.restore_ms
            );
        } else {
            println!(
                "drill {} at site {}: fail: {}",
                drill.vm, drill.site, drill.detail
            );
        }
        drills.push(drill);
    }
    store.audit(
        "failover-drill",
        serde_json::json!({"site": site, "drills": drills}),
    )?;
    Ok(if drills.iter().all(|d| d.passed) {
        0
    } else {
        1
    })
}

/// `cairn failback --site SITE`; returns the exit code.
pub fn failback(
    dir: &Path,
    state: Option<&Path>,
    site: &str,
    limit: Duration,
) -> anyhow::Result<u8> {
    let loaded = match load(dir, state)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    if loaded.model().site(site).is_none() {
        eprintln!("error: no site `{site}` in the specs");
        return Ok(1);
    }
    crate::site_failover::failback(&loaded, site, limit)
}

/// Every VM of `site` with disks that a protection plan replicates to another site,
/// with that site (the first such `replicate` of its plans).
pub(crate) fn replicated_vms<'m>(
    model: &'m compiler::Model,
    site: &str,
) -> Vec<(&'m compiler::model::Vm, String)> {
    model
        .vms
        .iter()
        .filter(|v| v.site == site && !v.disks.is_empty())
        .filter_map(|vm| {
            model
                .protection_plans
                .iter()
                .filter(|p| vm.protection_plans.contains(&p.name))
                .flat_map(|p| &p.replicate)
                .map(|r| r.to_site.clone())
                .find(|t| t != site)
                .map(|t| (&**vm, t))
        })
        .collect()
}

/// What a drill (or a failover) of one VM boots from.
pub(crate) struct DrillSource {
    /// The node that writes every DR copy of the VM's disks.
    pub(crate) node: String,
    /// The newest snapshot every DR copy committed, and its time.
    pub(crate) snapshot: String,
    pub(crate) at_unix_ms: u64,
    /// (DR copy, clone) per disk.
    pub(crate) clones: Vec<(String, String)>,
}

/// What a drill of `vm` at `dr_site` boots from, or why the VM cannot be drilled.
pub(crate) fn prepare(
    desired: &desired::Desired,
    observed: &Observed,
    vm: &compiler::model::Vm,
    dr_site: &str,
) -> Result<DrillSource, String> {
    let mut node: Option<String> = None;
    let mut snapshot: Option<(String, u64)> = None;
    let mut clones = vec![];
    if !desired.vms.contains_key(&vm.name) {
        return Err(format!(
            "vm `{}` is not placed, so its definition is not known here",
            vm.name
        ));
    }
    for disk in &vm.disks {
        let dr = compiler::place::dr_volume_name(&vm.name, dr_site, &disk.name);
        let held = observed.nodes.iter().find_map(|(n, o)| match o {
            NodeObservation::Reachable { replications, .. } => replications
                .get(&dr)
                .filter(|r| r.role == "target")
                .map(|r| (n.clone(), r.clone())),
            NodeObservation::Unreachable { .. } => None,
        });
        let Some((writer, replication)) = held else {
            return Err(format!(
                "no node that answered holds the DR copy {dr} of disk {} (`cairn apply` sets the replication up)",
                disk.name
            ));
        };
        if replication.last_replicated.is_empty() {
            return Err(format!(
                "the DR copy {dr} on {writer} holds no replicated snapshot yet"
            ));
        }
        match &node {
            Some(n) if *n != writer => {
                return Err(format!(
                    "its DR copies are written on different nodes ({n}, {writer}); the drill boots a VM on one node with all of them"
                ));
            }
            _ => node = Some(writer.clone()),
        }
        match &snapshot {
            Some((s, _)) if *s != replication.last_replicated => {
                return Err(format!(
                    "its DR copies' newest snapshots differ ({s}, {}): a transfer is in flight; run the drill again",
                    replication.last_replicated
                ));
            }
            _ => {
                snapshot = Some((
                    replication.last_replicated.clone(),
                    replication.last_replicated_at_unix_ms,
                ))
            }
        }
        clones.push((dr, format!("{}-{}-drill", vm.name, disk.name)));
    }
    let (Some(node), Some((snapshot, at))) = (node, snapshot) else {
        return Err("it has no disk".into());
    };
    Ok(DrillSource {
        node,
        snapshot,
        at_unix_ms: at,
        clones,
    })
}

/// Clones, defines, starts, waits for running and healthy, then removes everything:
/// `(passed, ms from the first clone to healthy, detail)`.
#[allow(clippy::too_many_arguments)]
async fn run(
    signer: &proto::auth::RequestSigner,
    desired: &desired::Desired,
    vm: &compiler::model::Vm,
    node: &str,
    address: &str,
    snapshot: &str,
    clones: &[(String, String)],
    limit: Duration,
) -> anyhow::Result<(bool, u64, String)> {
    let mut client = NodeClient::connect(address, signer.clone()).await?;
    let name = format!("{}-drill", vm.name);
    let id = |what: &str| format!("drill-{what}-{}", reconciler::state::random_id());
    let started = Instant::now();
    let mut outcome = async {
        for (dr, clone) in clones {
            client
                .apply(
                    NodeAction::CloneVolume {
                        volume: dr.clone(),
                        snapshot: snapshot.to_owned(),
                        name: clone.clone(),
                    }
                    .to_request(&id("clone")),
                )
                .await?;
        }
        let definition = reconciler::plan::drill_definition(
            &desired.vms[&vm.name],
            desired,
            &name,
            clones.iter().map(|(_, c)| c.clone()).collect(),
        );
        client.apply(definition.to_request(&id("create"))).await?;
        client
            .apply(NodeAction::StartVm { name: name.clone() }.to_request(&id("start")))
            .await?;
        loop {
            let answer = client.observe().await?;
            let status = answer.vms.iter().find(|v| v.name == name);
            let (state, health) = status.map_or((0, 0), |v| (v.state, v.health));
            if state == v1::VmState::Running as i32 && health == v1::Health::Healthy as i32 {
                return anyhow::Ok((true, started.elapsed().as_millis() as u64, String::new()));
            }
            if started.elapsed() > limit {
                return Ok((
                    false,
                    started.elapsed().as_millis() as u64,
                    format!(
                        "{name} on {node} was not running and healthy within {} s (state {}, health {})",
                        limit.as_secs(),
                        v1::VmState::try_from(state).map_or("unknown", |s| s.status_name()),
                        v1::Health::try_from(health).map_or("unknown", |h| h.status_name()),
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    .await
    .unwrap_or_else(|e| (false, 0, format!("on {node}: {e}")));
    // Everything the drill made goes, whatever happened.
    // A VM that never started cannot be stopped: that answer does not matter.
    let _ = client
        .apply(NodeAction::StopVm { name: name.clone() }.to_request(&id("stop")))
        .await;
    let mut left = vec![];
    for action in [NodeAction::DeleteVm { name: name.clone() }]
        .into_iter()
        .chain(clones.iter().map(|(_, clone)| NodeAction::DeleteVolume {
            name: clone.clone(),
        }))
    {
        if let Err(e) = client.apply(action.to_request(&id("cleanup"))).await
            // Deleting what is gone already is no failure.
            && !e.message().contains("not found")
            && !e.message().contains("no such")
        {
            left.push(format!(
                "{} {}: {}",
                action.word(),
                action.name(),
                e.message()
            ));
        }
    }
    if !left.is_empty() {
        outcome.0 = false;
        outcome.2 = format!(
            "{}{}the drill could not remove: {}",
            outcome.2,
            if outcome.2.is_empty() { "" } else { "; " },
            left.join("; ")
        );
    }
    Ok(outcome)
}
