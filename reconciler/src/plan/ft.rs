//! FT VMs (issue 22): the secondary's copy is wanted on its node, a primary that is
//! down is not started beside a secondary about to resume it, and a pair that is not
//! protected gets one `protect_vm` step (`crate::ft`).

use std::collections::BTreeMap;

use super::build::Builder;
use super::{Change, ChangeKind, LeftAlone, NodeAction};
use crate::desired::{Desired, DesiredVm};
use crate::observe::ObservedVm;

/// Whether `node` is the FT secondary's node of the desired VM `name`.
pub(super) fn is_secondary(desired: &Desired, name: &str, node: &str) -> bool {
    desired
        .vms
        .get(name)
        .and_then(|d| d.ft.as_ref())
        .is_some_and(|f| f.secondary == node)
}

/// `observed.vms()` without the copies on FT VMs' secondaries' nodes: for the VMs'
/// own planning a secondary is neither a copy to move nor a duplicate.
pub(super) fn without_secondaries<'o>(
    desired: &Desired,
    mut copies: BTreeMap<&'o str, Vec<(&'o str, &'o ObservedVm)>>,
) -> BTreeMap<&'o str, Vec<(&'o str, &'o ObservedVm)>> {
    for (name, on) in &mut copies {
        on.retain(|(node, _)| !is_secondary(desired, name, node));
    }
    copies
}

/// Why an FT VM's primary that is down must not be started again (`None`: it may
/// be): its secondary holds a complete checkpoint and has not given up, so the
/// witness lets it resume the guest (its node's guard promotes it, and the next
/// plan swaps the pair: [`crate::pipeline::swap_promoted`]). A primary started from
/// scratch beside it would be a second guest whose output goes back in time.
///
/// `copies` is [`Observed::vms`], made once by the caller (made per VM it was
/// quadratic in the cloud's VMs).
pub(super) fn takeover_pending(
    vm: &DesiredVm,
    copies: &BTreeMap<&str, Vec<(&str, &ObservedVm)>>,
) -> Option<String> {
    let ft = vm.ft.as_ref()?;
    let on = |node: &str| {
        copies
            .get(vm.name.as_str())?
            .iter()
            .find(|(n, _)| *n == node)
            .map(|(_, o)| *o)
    };
    if !on(&vm.node).is_some_and(ObservedVm::is_down) {
        return None;
    }
    let secondary = on(&ft.secondary)?;
    let epoch = secondary
        .ft
        .as_ref()
        .filter(|f| f.role == "secondary" && f.epoch > 0)
        .map(|f| f.epoch)?;
    secondary.is_running().then(|| {
        format!(
            "its primary is down and its secondary on {} holds checkpoint {epoch}: the secondary takes over (the witness decides), the primary is not started again",
            ft.secondary
        )
    })
}

/// FT VMs not protected now: a `protect_vm` step on the primary's node (the
/// secondary defined and waiting, then `StartFt`; `crate::ft`), after whatever this
/// plan does to the primary. A copy on the secondary's node that runs as something
/// else than a waiting secondary is stopped first. Nothing while the primary reports
/// `secondary-lost` (its node's guard and the witness decide which side runs first),
/// and nothing while either node does not answer.
pub(super) fn plan_ft(b: &mut Builder<'_>) {
    let desired = b.desired;
    let observed = b.observed;
    let observed_vms = observed.vms();
    for vm in desired.vms.values() {
        let Some(ft) = &vm.ft else {
            continue;
        };
        if vm.power_off
            || !observed.reachable(&vm.node)
            || b.left_alone
                .iter()
                .any(|l| l.object == "vm" && l.name == vm.name)
        {
            continue;
        }
        if let Some(volume) = vm.volumes.first() {
            // The node refuses PrepareFtSecondary for a VM with volumes: each side
            // needs a copy of its own that only its VMM writes, which the volume
            // layer does not give (node-runtime/ARCHITECTURE.md, "Disks"). A step
            // that fails on every apply would hide that; the plan says it instead.
            b.left_alone.push(LeftAlone {
                object: "vm".into(),
                name: vm.name.clone(),
                node: vm.node.clone(),
                reason: format!(
                    "not fault tolerant: it has a volume (`{volume}`) and the node runtime does not yet keep an FT secondary's copy of one; it runs unprotected, its secondary's place on {} stays reserved",
                    ft.secondary
                ),
            });
            continue;
        }
        if !observed.reachable(&ft.secondary) {
            b.left_alone.push(LeftAlone {
                object: "vm".into(),
                name: vm.name.clone(),
                node: ft.secondary.clone(),
                reason: String::new(),
            });
            continue;
        }
        let copies = observed_vms
            .get(vm.name.as_str())
            .cloned()
            .unwrap_or_default();
        let on = |node: &str| copies.iter().find(|(n, _)| *n == node).map(|(_, o)| *o);
        let primary_ft = on(&vm.node).and_then(|o| o.ft.as_ref());
        let secondary = on(&ft.secondary);
        // The steps this plan takes on the primary (create, start, replace).
        let primary_steps: Vec<usize> = b
            .changes
            .iter()
            .filter(|c| c.object == "vm" && c.name == vm.name && c.node == vm.node)
            .flat_map(|c| c.steps.iter().copied())
            .collect();
        if primary_steps.is_empty() && primary_ft.is_some_and(|f| f.phase == "secondary-lost") {
            b.left_alone.push(LeftAlone {
                object: "vm".into(),
                name: vm.name.clone(),
                node: vm.node.clone(),
                reason: "its primary lost its secondary: its node's guard asks the witness whether it runs alone first".into(),
            });
            continue;
        }
        let protecting = primary_ft.is_some_and(|f| {
            f.role == "primary" && crate::ft::PRIMARY_PROTECTING.contains(&f.phase.as_str())
        });
        let holding = secondary.is_some_and(|o| {
            o.is_running()
                && o.ft.as_ref().is_some_and(|f| {
                    f.role == "secondary"
                        && crate::ft::SECONDARY_HOLDING.contains(&f.phase.as_str())
                })
        });
        if primary_steps.is_empty() && protecting && holding {
            continue;
        }
        let mut deps = primary_steps;
        // The pair's nodes' bonds and segments first: a secondary of a VM with NICs
        // receives checkpoints on its node's underlay address.
        deps.extend(
            b.steps
                .iter()
                .filter(|s| {
                    (s.node == vm.node || s.node == ft.secondary)
                        && matches!(
                            s.action,
                            NodeAction::ApplyBond { .. } | NodeAction::ApplyNetworkSegment(_)
                        )
                })
                .map(|s| s.id),
        );
        let mut steps = vec![];
        let mut details = vec![format!(
            "fault tolerance: secondary on {}, checkpoints every {} ms, witness {}",
            ft.secondary,
            if ft.epoch_ms == 0 { 30 } else { ft.epoch_ms },
            if ft.witness.is_empty() {
                "none"
            } else {
                ft.witness.as_str()
            }
        )];
        if let Some(f) = primary_ft {
            details.push(format!("re-protect: its primary is `{}`", f.phase));
        }
        if let Some(o) = secondary.filter(|o| o.is_running() && !holding) {
            let stop = b.step(
                &ft.secondary,
                NodeAction::StopVm {
                    name: vm.name.clone(),
                },
                vec![],
            );
            deps.push(stop);
            steps.push(stop);
            details.push(format!(
                "its copy on {} runs as {}: stopped, to wait for checkpoints",
                ft.secondary,
                o.ft.as_ref().map_or("a plain VM".to_owned(), |f| format!(
                    "an FT {} ({})",
                    f.role, f.phase
                ))
            ));
        }
        let protect = b.step(
            &vm.node,
            NodeAction::ProtectVm {
                name: vm.name.clone(),
                secondary: ft.secondary.clone(),
                secondary_address: b.address(&ft.secondary),
                definition: Box::new(secondary_definition(vm, desired)),
                witness: ft.witness.clone(),
                epoch_ms: ft.epoch_ms,
            },
            deps,
        );
        steps.push(protect);
        b.changes.push(Change {
            details,
            steps,
            ..Change::new(ChangeKind::Update, "vm", &vm.name, &vm.tenant, &vm.node)
        });
    }
}

/// The `CreateVm` of an FT VM's secondary: its primary's definition (NICs with the
/// same addresses: the secondary resumes the same guest), with the MTU of the
/// secondary's node's segments.
fn secondary_definition(vm: &DesiredVm, desired: &Desired) -> NodeAction {
    let on_secondary = DesiredVm {
        node: vm
            .ft
            .as_ref()
            .map_or_else(|| vm.node.clone(), |f| f.secondary.clone()),
        ..vm.clone()
    };
    super::vms::vm_definition(&on_secondary, desired)
}

#[cfg(test)]
mod tests {
    use crate::desired;
    use crate::observe::{NodeObservation, Observed, ObservedFt, ObservedVm};
    use crate::plan::{NodeAction, Plan, plan};

    /// The quickstart's FT VM (reserved, no disk, a NIC on dev-net).
    const VM: &str = "ledger";

    /// The quickstart: its site has a witness and `ledger` is an FT VM.
    fn model() -> compiler::Model {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let sources = compiler::source::Sources::load_dir(&root).expect("the quickstart loads");
        let compilation = compiler::compile(&sources);
        assert!(!compilation.has_errors(), "{:?}", compilation.diagnostics);
        compilation.model
    }

    /// The quickstart with `line` added to the FT VM's body.
    fn compile_with(line: &str) -> compiler::Compilation {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let files: Vec<(String, String)> = ["cluster.kdl", "tenants.kdl", "workloads.kdl"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(root.join(f)).expect("quickstart");
                let text = text.replacen(
                    "    availability \"ft\"\n",
                    &format!("    availability \"ft\"\n    {line}\n"),
                    1,
                );
                ((*f).to_owned(), text)
            })
            .collect();
        let compilation = compiler::compile(&compiler::source::Sources::from_files(files));
        assert!(!compilation.has_errors(), "{:?}", compilation.diagnostics);
        compilation
    }

    /// The spec's `ft-epoch` is the epoch the protect step sends; without it, 0 (the
    /// node's 30 ms).
    #[test]
    fn the_specs_ft_epoch_is_sent_to_the_pair() {
        let compilation = compile_with("ft-epoch \"50ms\"");
        for (model, epoch) in [(compilation.model, 50), (model(), 0)] {
            let placement = desired::place(&model, None);
            let want = desired::desired(&model, std::path::Path::new("."), placement);
            let ft = want.vms[VM].ft.clone().expect("an FT pair");
            assert_eq!(ft.epoch_ms, epoch);
            let mut observed = Observed::default();
            let nodes: Vec<&String> = want.nodes.keys().collect();
            reachable(&mut observed, &nodes);
            let p = plan(&want, &observed, "r");
            let protect = p
                .steps
                .iter()
                .find(|s| s.action.word() == "protect_vm")
                .expect("a protect step");
            let NodeAction::ProtectVm { epoch_ms, .. } = &protect.action else {
                panic!("{protect:?}");
            };
            assert_eq!(*epoch_ms, epoch);
        }
    }

    /// An FT VM with a disk is warned of by the compiler, created and started on its
    /// primary with its volume, and never protected: the node would refuse the
    /// secondary (no copy of the volume of its own), so the plan says why instead of
    /// issuing a step that fails on every apply, and the cloud is not converged.
    #[test]
    fn an_ft_vm_with_a_disk_runs_unprotected_and_the_plan_says_why() {
        let compilation = compile_with("disk \"journal\" size=\"64MiB\" pool=\"local\"");
        let warning = compilation
            .diagnostics
            .iter()
            .find(|d| d.code == "cairn::check::ft_disks_unprotected")
            .expect("a warning");
        assert!(warning.message.contains("`ledger`"), "{}", warning.message);
        let model = compilation.model;
        let placement = desired::place(&model, None);
        let want = desired::desired(&model, std::path::Path::new("."), placement);
        let ft = want.vms[VM]
            .ft
            .clone()
            .expect("its secondary is still placed");
        let mut observed = Observed::default();
        let nodes: Vec<&String> = want.nodes.keys().collect();
        reachable(&mut observed, &nodes);
        let p = plan(&want, &observed, "r");
        let primary = want.vms[VM].node.clone();
        assert_eq!(
            ft_steps(&p),
            vec![
                ("create_vm".to_owned(), primary.clone()),
                ("start_vm".to_owned(), primary.clone()),
            ]
        );
        assert!(
            p.steps.iter().any(|s| s.action.word() == "create_volume"
                && s.action.name() == "ledger-journal"
                && s.node == primary),
            "{:?}",
            p.steps
        );
        let left = p
            .left_alone
            .iter()
            .find(|l| l.object == "vm" && l.name == VM)
            .expect("left alone");
        assert_eq!(left.node, primary);
        assert!(
            left.reason.contains("`ledger-journal`") && left.reason.contains(&ft.secondary),
            "{}",
            left.reason
        );
        assert!(
            p.not_converged()
                .iter()
                .any(|n| n.contains("not fault tolerant")),
            "{:?}",
            p.not_converged()
        );
    }

    fn reachable(observed: &mut Observed, nodes: &[&String]) {
        for node in nodes {
            observed.nodes.insert(
                (*node).clone(),
                NodeObservation::Reachable {
                    public_key_hex: String::new(),
                    vms: Default::default(),
                    volumes: Default::default(),
                    bonds: Default::default(),
                    networking: Default::default(),
                    protections: Default::default(),
                    replications: Default::default(),
                },
            );
        }
    }

    fn put(observed: &mut Observed, node: &str, running: bool, ft: Option<(&str, &str, u64)>) {
        let Some(NodeObservation::Reachable { vms, .. }) = observed.nodes.get_mut(node) else {
            panic!("{node} is observed");
        };
        let mut vm: ObservedVm = serde_json::from_value(serde_json::json!({
            "name": VM, "state": if running { "running" } else { "crashed" },
            "health": "healthy", "vcpus": 1, "memory_bytes": 64 << 20, "crash_count": 0,
            "volumes": [], "sla": "reserved",
            "nics": [{"network": "dev-net", "tap": "t0", "bridge": "b0", "ready": true,
                      "detail": "", "mac": "", "guest_up": true}],
        }))
        .expect("an observed VM");
        vm.ft = ft.map(|(role, phase, acked)| ObservedFt {
            role: role.into(),
            phase: phase.into(),
            epoch_ms: 30,
            epoch: acked,
            last_acked: acked,
            ..ObservedFt::default()
        });
        vms.insert(VM.into(), vm);
    }

    fn ft_steps(plan: &Plan) -> Vec<(String, String)> {
        plan.steps
            .iter()
            .filter(|s| s.action.name() == VM)
            .map(|s| (s.action.word().to_owned(), s.node.clone()))
            .collect()
    }

    #[test]
    fn an_ft_vm_is_created_started_and_protected_and_a_promoted_secondary_is_re_protected() {
        let model = model();
        let placement = desired::place(&model, None);
        let at = placement
            .vms
            .iter()
            .find(|v| v.name == VM)
            .expect("the FT VM is placed")
            .clone();
        let (primary, secondary) = (at.node.clone(), at.secondary.clone().expect("a secondary"));
        assert_ne!(primary, secondary);
        let root = std::path::Path::new(".");
        let want = desired::desired(&model, root, placement.clone());
        let ft = want.vms[VM].ft.clone().expect("an FT pair");
        assert_eq!(ft.witness, "127.0.0.14:7400");
        assert_eq!(ft.secondary, secondary);
        let nodes: Vec<&String> = want.nodes.keys().collect();

        // Nothing runs: created and started on the primary, then protected.
        let mut observed = Observed::default();
        reachable(&mut observed, &nodes);
        let first = plan(&want, &observed, "r1");
        assert_eq!(
            ft_steps(&first),
            vec![
                ("create_vm".to_owned(), primary.clone()),
                ("start_vm".to_owned(), primary.clone()),
                ("protect_vm".to_owned(), primary.clone()),
            ]
        );
        let protect = first
            .steps
            .iter()
            .find(|s| s.action.word() == "protect_vm")
            .expect("protect");
        let start = first
            .steps
            .iter()
            .find(|s| s.action.word() == "start_vm" && s.action.name() == VM)
            .expect("start");
        assert!(protect.depends_on.contains(&start.id), "{protect:?}");
        let NodeAction::ProtectVm {
            secondary: to,
            witness,
            definition,
            ..
        } = &protect.action
        else {
            panic!("{protect:?}");
        };
        assert_eq!((to, witness.as_str()), (&secondary, "127.0.0.14:7400"));
        assert!(matches!(**definition, NodeAction::CreateVm { .. }));

        // Protected: nothing to do, and the secondary's copy is not deleted.
        put(
            &mut observed,
            &primary,
            true,
            Some(("primary", "protected", 40)),
        );
        put(
            &mut observed,
            &secondary,
            true,
            Some(("secondary", "protected", 40)),
        );
        assert_eq!(ft_steps(&plan(&want, &observed, "r1")), vec![]);

        // The primary's VMM died and the secondary holds checkpoint 40: the primary
        // is not started again.
        put(&mut observed, &primary, false, None);
        put(
            &mut observed,
            &secondary,
            true,
            Some(("secondary", "primary-lost", 40)),
        );
        let waiting = plan(&want, &observed, "r1");
        assert_eq!(ft_steps(&waiting), vec![], "{:?}", waiting.steps);
        assert!(
            waiting
                .left_alone
                .iter()
                .any(|l| l.name == VM && l.reason.contains("takes over")),
            "{:?}",
            waiting.left_alone
        );

        // Promoted: the placement swaps the pair and the former primary's node gets
        // a new secondary; the promoted guest is neither moved nor restarted.
        put(
            &mut observed,
            &secondary,
            true,
            Some(("secondary", "promoted", 40)),
        );
        let mut previous = placement.clone();
        assert_eq!(
            crate::pipeline::swap_promoted(&mut previous, &observed),
            vec![VM.to_owned()]
        );
        let swapped = desired::desired(&model, root, desired::place(&model, Some(&previous)));
        assert_eq!(swapped.vms[VM].node, secondary);
        let again = plan(&swapped, &observed, "r1");
        let re_protect = ft_steps(&again);
        assert_eq!(
            re_protect.last(),
            Some(&("protect_vm".to_owned(), secondary.clone())),
            "{:?}",
            again.steps
        );
        assert!(
            !re_protect
                .iter()
                .any(|(word, node)| *node == secondary && word != "protect_vm"),
            "{re_protect:?}"
        );
        let new_secondary = swapped.vms[VM].ft.as_ref().expect("pair").secondary.clone();
        assert_ne!(new_secondary, secondary);
    }
}
