//! Dedicated CPUs for reserved VMs (issue 20, an SLA profile's `cpu-pinning=#true`):
//! the node gives a pinned VM CPUs of its own in a cpuset cgroup, keeps its other VMs
//! off them, reports them, repairs drift and gives them back. Checked against the
//! kernel: each VMM thread's `Cpus_allowed_list` in /proc. Real cairn-vmm processes on
//! KVM, real cpusets; node on 127.0.0.81.

use std::path::PathBuf;

use proto::client::NodeClient;
use proto::v1::{CreateVm, apply_request::Action, create_vm::Image};

use crate::harness::{TestNode, apply_ok, controller, request};
use crate::vms::{observe_vm, start, vms_can_run};

fn vm(name: &str, sla: &str, vcpus: u32, dedicated: bool) -> CreateVm {
    CreateVm {
        name: name.into(),
        vcpus,
        memory_bytes: 32 << 20,
        image: Some(Image::Builtin("cairn-guest".into())),
        sla: sla.into(),
        priority: if sla == "reserved" { 1000 } else { 500 },
        tenant: "dev".into(),
        dedicated_cpus: dedicated,
        ..Default::default()
    }
}

/// Every thread of process `pid`: (tid, name, the CPUs it may run on).
fn threads(pid: u32) -> Vec<(u32, String, Vec<u32>)> {
    node_runtime::cpusets::thread_ids(pid)
        .into_iter()
        .filter_map(|tid| {
            Some((
                tid,
                node_runtime::cpusets::thread_name(pid, tid),
                node_runtime::cpusets::thread_affinity(pid, tid)?,
            ))
        })
        .collect()
}

/// The CPUs of `pid`'s vCPU threads (`vcpu0`, …), each thread's list.
fn vcpu_affinities(pid: u32) -> Vec<Vec<u32>> {
    threads(pid)
        .into_iter()
        .filter(|(_, name, _)| name.starts_with("vcpu"))
        .map(|(_, _, cpus)| cpus)
        .collect()
}

/// The directory of `path` in the v1 hierarchy of `controller`.
fn hierarchy_dir(controller: &str, path: &str) -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let mount = mounts
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|f| f[2] == "cgroup" && f[3].split(',').any(|o| o == controller))
        .map(|f| f[1].to_string())
        .expect("the hierarchy is mounted");
    PathBuf::from(format!("{mount}{path}"))
}

/// The cpuset hierarchy's directory for `path` (v1: the cpuset mount; v2: unified).
fn cpuset_dir(version: &str, path: &str) -> PathBuf {
    if version == "v1" {
        return hierarchy_dir("cpuset", path);
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let mount = mounts
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|f| f[2] == "cgroup2")
        .map(|f| f[1].to_string())
        .expect("cgroup2 is mounted");
    PathBuf::from(format!("{mount}{path}"))
}

fn list(cpus: &[u32]) -> String {
    node_runtime::cpusets::format_list(cpus)
}

/// Sends r's definition (1 vCPU, reserved) with or without dedicated CPUs.
async fn define_r(client: &mut NodeClient, id: &str, pinned: bool) {
    apply_ok(client, id, Action::CreateVm(vm("r", "reserved", 1, pinned))).await;
}

/// The CPUs a VM's cpuset holds, as the node reports them.
async fn cpuset_of(client: &mut NodeClient, name: &str) -> String {
    observe_vm(client, name).await.cgroup.unwrap().cpuset_cpus
}

async fn observe_usage(client: &mut NodeClient) -> proto::v1::NodeUsage {
    client.observe().await.unwrap().usage.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_vm_gets_cpus_of_its_own_which_others_leave_and_drift_is_repaired() {
    if !vms_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = TestNode::start_on("t-pin", dir.path(), &controller, "127.0.0.81");
    let mut client = node.client(&controller).await;
    let usage = observe_usage(&mut client).await;
    if usage.cgroup_version.is_empty() || usage.dedicated_cpus.is_empty() {
        eprintln!(
            "skipping: the node dedicates no CPUs here: {}",
            usage.cgroup_detail
        );
        return;
    }
    let version = usage.cgroup_version.clone();
    let dedicable = node_runtime::cpusets::parse_list(&usage.dedicated_cpus).unwrap();
    let online = std::thread::available_parallelism().unwrap().get() as u32;
    eprintln!(
        "cgroup {version}, {online} CPUs, dedicable {}, free {}",
        usage.dedicated_cpus, usage.dedicated_cpus_free
    );
    assert_eq!(usage.dedicated_cpus_free, usage.dedicated_cpus);
    // By default every CPU but the lowest may be dedicated.
    assert!(!dedicable.contains(&0), "{dedicable:?}");

    // A pinned reserved VM of 1 vCPU and an on-demand VM.
    apply_ok(
        &mut client,
        "r",
        Action::CreateVm(vm("r", "reserved", 1, true)),
    )
    .await;
    apply_ok(
        &mut client,
        "o",
        Action::CreateVm(vm("o", "on-demand", 1, false)),
    )
    .await;
    apply_ok(&mut client, "r-start", start("r")).await;
    apply_ok(&mut client, "o-start", start("o")).await;
    let r = observe_vm(&mut client, "r").await;
    let o = observe_vm(&mut client, "o").await;
    let mine = vec![dedicable[0]];
    assert_eq!(r.dedicated_cpus, list(&mine), "{r:?}");
    assert!(o.dedicated_cpus.is_empty(), "{o:?}");
    let (rc, oc) = (r.cgroup.clone().unwrap(), o.cgroup.clone().unwrap());
    assert!(rc.drift.is_empty() && oc.drift.is_empty(), "{rc:?} {oc:?}");
    assert_eq!(rc.cpuset_cpus, list(&mine));
    let shared: Vec<u32> = (0..online).filter(|cpu| !mine.contains(cpu)).collect();
    assert_eq!(oc.cpuset_cpus, list(&shared));
    let usage = observe_usage(&mut client).await;
    let free: Vec<u32> = dedicable
        .iter()
        .copied()
        .filter(|c| !mine.contains(c))
        .collect();
    assert_eq!(usage.dedicated_cpus_free, list(&free));

    // The kernel's view: every vCPU thread of r's VMM (and every other thread of it)
    // may run only on its CPU; no thread of o's VMM may run there.
    let vcpus = vcpu_affinities(r.pid);
    assert_eq!(vcpus.len(), 1, "{:?}", threads(r.pid));
    assert_eq!(vcpus[0], mine, "vcpu0 of r: {:?}", threads(r.pid));
    for (tid, name, cpus) in threads(r.pid) {
        assert_eq!(cpus, mine, "thread {name} ({tid}) of r");
    }
    for (tid, name, cpus) in threads(o.pid) {
        assert!(
            cpus.iter().all(|cpu| !mine.contains(cpu)),
            "thread {name} ({tid}) of o may run on {cpus:?}, which includes r's CPU {mine:?}"
        );
    }
    eprintln!(
        "r (pid {}): threads {:?}; o (pid {}): threads {:?}",
        r.pid,
        threads(r.pid),
        o.pid,
        threads(o.pid)
    );

    // Too few free CPUs: the start is refused, saying who holds them.
    let wanted = free.len() as u32 + 1;
    apply_ok(
        &mut client,
        "r2",
        Action::CreateVm(vm("r2", "reserved", wanted, true)),
    )
    .await;
    let refused = client
        .apply(request("r2-start", start("r2")))
        .await
        .expect_err("no room for r2's dedicated CPUs");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains(&format!(
            "needs {wanted} dedicated CPU{}",
            if wanted == 1 { "" } else { "s" }
        )) && refused.message().contains("to vm `r`"),
        "{}",
        refused.message()
    );
    apply_ok(
        &mut client,
        "r2-delete",
        Action::DeleteVm(proto::v1::DeleteVm { name: "r2".into() }),
    )
    .await;
    // o still shares the same CPUs: the refused VM took none.
    let o_now = observe_vm(&mut client, "o").await.cgroup.unwrap();
    assert_eq!(o_now.cpuset_cpus, list(&shared), "{o_now:?}");

    // Drift: r's cpuset widened by hand is reported, and the same definition again
    // narrows it; the kernel follows.
    let r_dir = cpuset_dir(&version, &rc.cpuset_path);
    let every: Vec<u32> = (0..online).collect();
    std::fs::write(r_dir.join("cpuset.cpus"), list(&every)).unwrap();
    assert_eq!(vcpu_affinities(r.pid), vec![every.clone()]);
    let drifted = observe_vm(&mut client, "r").await.cgroup.unwrap();
    assert!(
        drifted.drift.contains(&format!(
            "cpuset.cpus is {}, its dedicated CPUs are {}",
            list(&every),
            list(&mine)
        )),
        "{drifted:?}"
    );
    define_r(&mut client, "r-repair", true).await;
    let repaired = observe_vm(&mut client, "r").await.cgroup.unwrap();
    assert!(repaired.drift.is_empty(), "{repaired:?}");
    assert_eq!(vcpu_affinities(r.pid), vec![mine.clone()]);

    // v1: a vCPU thread moved out of the cpuset (into o's) is drift too, and the
    // repair moves the whole VMM back.
    if version == "v1" {
        let (tid, _, _) = threads(r.pid)
            .into_iter()
            .find(|(_, name, _)| name == "vcpu0")
            .unwrap();
        let o_dir = cpuset_dir(&version, &oc.cpuset_path);
        std::fs::write(o_dir.join("tasks"), tid.to_string()).unwrap();
        assert_eq!(vcpu_affinities(r.pid), vec![shared.clone()]);
        let drifted = observe_vm(&mut client, "r").await.cgroup.unwrap();
        assert!(
            drifted.drift.contains(&format!(
                "thread vcpu0 (tid {tid}) of the VMM is not in its cpuset"
            )),
            "{drifted:?}"
        );
        define_r(&mut client, "r-repair-2", true).await;
        assert_eq!(vcpu_affinities(r.pid), vec![mine.clone()]);
        assert!(
            observe_vm(&mut client, "r")
                .await
                .cgroup
                .unwrap()
                .drift
                .is_empty()
        );
    }

    // Unpinned in place (the profile dropped cpu-pinning): same process, its CPU goes
    // back to everyone; pinned again, it is taken back.
    define_r(&mut client, "r-unpin", false).await;
    let unpinned = observe_vm(&mut client, "r").await;
    assert_eq!(unpinned.pid, r.pid);
    assert!(unpinned.dedicated_cpus.is_empty(), "{unpinned:?}");
    assert_eq!(vcpu_affinities(r.pid), vec![every.clone()]);
    assert_eq!(cpuset_of(&mut client, "o").await, list(&every));
    define_r(&mut client, "r-pin", true).await;
    assert_eq!(vcpu_affinities(r.pid), vec![mine.clone()]);
    for (tid, name, cpus) in threads(o.pid) {
        assert!(
            cpus.iter().all(|cpu| !mine.contains(cpu)),
            "thread {name} ({tid}) of o may run on {cpus:?} after r was pinned again"
        );
    }

    // Deleting r gives its CPU back: o's VMM may run everywhere again.
    for name in ["r", "o"] {
        apply_ok(
            &mut client,
            &format!("{name}-delete"),
            Action::DeleteVm(proto::v1::DeleteVm { name: name.into() }),
        )
        .await;
        if name == "r" {
            assert_eq!(cpuset_of(&mut client, "o").await, list(&every));
            assert_eq!(vcpu_affinities(o.pid), vec![every.clone()]);
            assert!(!r_dir.exists(), "{} is left", r_dir.display());
        }
    }
    assert_eq!(
        observe_usage(&mut client).await.dedicated_cpus_free,
        usage.dedicated_cpus
    );
    drop(client);
    drop(node);
    // The node's parent cgroups stay after it exits (as every node's do): remove
    // this test's, in every hierarchy it used.
    let parent = |path: &str| {
        std::path::Path::new(path)
            .parent()
            .map(|p| p.display().to_string())
    };
    let mut parents: Vec<PathBuf> = Vec::new();
    if version == "v1" {
        let memory = if rc.memory_path.is_empty() {
            &rc.path
        } else {
            &rc.memory_path
        };
        parents.extend(parent(&rc.path).map(|p| hierarchy_dir("cpu", &p)));
        parents.extend(parent(memory).map(|p| hierarchy_dir("memory", &p)));
    }
    parents.extend(parent(&rc.cpuset_path).map(|p| cpuset_dir(&version, &p)));
    for dir in parents {
        let _ = std::fs::remove_dir(dir);
    }
}
