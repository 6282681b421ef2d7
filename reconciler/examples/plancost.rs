use reconciler::desired::Desired;
use reconciler::observe::*;
use std::time::Instant;

fn converged(d: &Desired) -> Observed {
    let mut o = Observed::default();
    for node in d.nodes.keys() {
        o.nodes.insert(
            node.clone(),
            NodeObservation::Reachable {
                public_key_hex: "ab".repeat(32),
                vms: Default::default(),
                volumes: Default::default(),
                bonds: Default::default(),
                networking: Default::default(),
                protections: Default::default(),
                replications: Default::default(),
            },
        );
    }
    for vm in d.vms.values() {
        let ob = ObservedVm {
            name: vm.name.clone(),
            state: proto::v1::VmState::Running,
            health: proto::v1::Health::Healthy,
            vcpus: vm.vcpus,
            memory_bytes: vm.memory_bytes,
            crash_count: 0,
            volumes: vm.volumes.clone(),
            nics: vm
                .nics
                .iter()
                .map(|n| ObservedNic {
                    network: n.clone(),
                    tap: "tap0".into(),
                    bridge: "br".into(),
                    ready: true,
                    detail: String::new(),
                    mac: "52:54:00:00:00:01".into(),
                    guest_up: true,
                })
                .collect(),
            image: Some(vm.image.clone()),
            starts: 1,
            disks: vec![],
            guest_block_test: String::new(),
            sla: String::new(),
            priority: 0,
            cgroup_drift: vec![],
            dedicated_cpus: String::new(),
            preempted: String::new(),
            ft: None,
        };
        if let Some(NodeObservation::Reachable { vms, .. }) = o.nodes.get_mut(&vm.node) {
            vms.insert(vm.name.clone(), ob);
        }
    }
    o
}

fn main() {
    let nodes: usize = std::env::args()
        .nth(1)
        .map_or(10000, |s| s.parse().unwrap());
    let vms: usize = std::env::args()
        .nth(2)
        .map_or(100000, |s| s.parse().unwrap());
    let files = compiler::generate::generate(&compiler::generate::GenConfig {
        nodes,
        vms,
        seed: 1,
    });
    let c = compiler::compile(&compiler::Sources::from_files(files));
    let p = reconciler::desired::place(&c.model, None);
    let root = std::path::Path::new("/tmp");
    for _ in 0..2 {
        let t = Instant::now();
        let d = reconciler::desired::desired(&c.model, root, p.clone());
        let td = t.elapsed();
        let t = Instant::now();
        let pc = p.clone();
        let tpc = t.elapsed();
        drop(pc);
        let t = Instant::now();
        let o = converged(&d);
        let to = t.elapsed();
        let t = Instant::now();
        let o2 = o.clone();
        let toc = t.elapsed();
        let t = Instant::now();
        let eq = o == o2;
        let teq = t.elapsed();
        let t = Instant::now();
        let dig = o.digest();
        let tdig = t.elapsed();
        let t = Instant::now();
        let plan = reconciler::plan::plan(&d, &o, "r");
        let tplan = t.elapsed();
        let t = Instant::now();
        let vmsmap = o.vms();
        let tvms = t.elapsed();
        drop(vmsmap);
        println!(
            "desired {td:?} placement-clone {tpc:?} observed-build {to:?} observed-clone {toc:?} eq {eq} {teq:?} digest {tdig:?} {} plan {tplan:?} vms() {tvms:?}",
            &dig[..8]
        );
        let mut kinds = std::collections::BTreeMap::new();
        for ch in &plan.changes {
            *kinds
                .entry(format!("{} {:?}", ch.object, ch.kind))
                .or_insert(0) += 1;
        }
        println!(
            "changes {} steps {} left_alone {} refused {} {:?}",
            plan.changes.len(),
            plan.steps.len(),
            plan.left_alone.len(),
            plan.refused.len(),
            kinds
        );
        if let Some(ch) = plan.changes.iter().find(|c| c.object == "vm") {
            println!("{:?}", ch.details);
        }
    }
}
