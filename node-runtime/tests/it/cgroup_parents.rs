//! A node's parent cgroups (`cairn-NAME-HASH` in the cpu, memory and cpuset
//! hierarchies) do not outlive it: a clean exit removes them unless a VMM that runs on
//! is in them, and a node removes at start the empty ones that earlier nodes of its
//! name left (killed before their exit), but never one a running node owns or a
//! process is in. Real cgroup v1 hierarchies, real cairn-node and cairn-vmm processes;
//! nodes on 127.0.0.82-83.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use proto::v1::{CreateVm, apply_request::Action, create_vm::Image};

use crate::harness::{TestNode, apply_ok, controller, kill_vmms_of};
use crate::vms::{start, vms_can_run};

const NAME: &str = "d-cgparents";

/// The mount point of the v1 hierarchy holding `controller`, if mounted.
fn v1_mount(controller: &str) -> Option<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .ok()?
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == controller))
        .map(|f| PathBuf::from(f[1]))
}

/// Where process `pid` is in the v1 hierarchy of `controller`.
fn cgroup_of(pid: u32, controller: &str) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = text
        .lines()
        .find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == controller)
                .then(|| path.to_owned())
        })
        .unwrap_or_else(|| panic!("process {pid} is in no {controller} cgroup"));
    v1_mount(controller)
        .unwrap()
        .join(path.trim_start_matches('/'))
}

/// The parent cgroups of the node of `data_dir`, started by the process `pid`, in the
/// cpu, memory and cpuset hierarchies.
fn parents_of(pid: u32, data_dir: &Path) -> Vec<PathBuf> {
    let id = node_runtime::cgroups::node_id(NAME, data_dir.as_os_str());
    ["cpu", "memory", "cpuset"]
        .into_iter()
        .map(|controller| cgroup_of(pid, controller).join(format!("cairn-{id}")))
        .collect()
}

/// A process put into a cgroup (killed and reaped when dropped).
struct Occupant(Child);

impl Drop for Occupant {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nodes_parent_cgroups_go_at_its_clean_exit_and_stale_ones_of_its_name_at_start() {
    if !vms_can_run() {
        return;
    }
    if ["cpu", "memory", "cpuset"]
        .iter()
        .any(|c| v1_mount(c).is_none())
    {
        eprintln!(
            "skipping: the test reads the cgroup v1 cpu, memory and cpuset hierarchies, not all mounted here"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    // A running node of the same name (another data directory): its parents stay.
    let twin_dir = dir.path().join("twin");
    let mut twin = TestNode::start_on(NAME, &twin_dir, &controller, "127.0.0.83");
    let twin_parents = parents_of(twin.pid(), &twin_dir);
    if !twin_parents.iter().all(|p| p.is_dir()) {
        eprintln!(
            "skipping: the node enforces no SLA classes here: {}",
            twin.log()
        );
        return;
    }
    // Parents that killed nodes of this name left beside them, each with an empty VM
    // cgroup, in every hierarchy; and one with a process in it.
    let beside = |parent: &PathBuf| parent.parent().unwrap().to_path_buf();
    let stale: Vec<PathBuf> = twin_parents
        .iter()
        .map(|p| beside(p).join(format!("cairn-{NAME}-0badcafe")))
        .collect();
    for parent in &stale {
        std::fs::create_dir_all(parent.join("vm-gone")).unwrap();
    }
    let busy = beside(&twin_parents[0]).join(format!("cairn-{NAME}-0badbeef"));
    std::fs::create_dir_all(busy.join("vm-runs")).unwrap();
    let occupant = Occupant(Command::new("sleep").arg("60").spawn().unwrap());
    std::fs::write(
        busy.join("vm-runs/cgroup.procs"),
        occupant.0.id().to_string(),
    )
    .unwrap();
    // Another node's name that merely starts the same: not this node's.
    let other = beside(&twin_parents[0]).join(format!("cairn-{NAME}x-0badcafe"));
    std::fs::create_dir_all(&other).unwrap();

    let node_dir = dir.path().join("node");
    let mut node = TestNode::start_on(NAME, &node_dir, &controller, "127.0.0.82");
    let parents = parents_of(node.pid(), &node_dir);
    for parent in &stale {
        assert!(!parent.exists(), "{} is left", parent.display());
        assert!(
            node.log()
                .contains(&format!("removed {}", parent.display())),
            "the node says it removed {}: {}",
            parent.display(),
            node.log()
        );
    }
    assert!(
        busy.join("vm-runs").is_dir(),
        "a cgroup with a process stays"
    );
    assert!(other.is_dir(), "another name's parent stays");
    for parent in twin_parents.iter().chain(&parents) {
        assert!(parent.is_dir(), "{} stays", parent.display());
    }

    // A VM that runs on after its agent's exit keeps the parents.
    let mut client = node.client(&controller).await;
    apply_ok(
        &mut client,
        "v-create",
        Action::CreateVm(CreateVm {
            name: "v".into(),
            vcpus: 1,
            memory_bytes: 32 << 20,
            image: Some(Image::Builtin("cairn-guest".into())),
            tenant: "dev".into(),
            ..Default::default()
        }),
    )
    .await;
    apply_ok(&mut client, "v-start", start("v")).await;
    drop(client);
    for parent in &parents {
        assert!(
            parent.join("vm-v").is_dir(),
            "v's cgroup under {}",
            parent.display()
        );
    }
    let log = {
        assert_eq!(node.terminate(), Some(0), "{}", node.log());
        node.log()
    };
    for parent in &parents {
        assert!(
            parent.join("vm-v").is_dir(),
            "the running VM keeps its cgroup"
        );
        assert!(
            log.contains(&format!("its cgroup {} stays", parent.display())),
            "{log}"
        );
    }
    assert!(log.contains("1 VM(s) still run in it (v)"), "{log}");

    // With its VMM gone, the next clean exit leaves nothing.
    kill_vmms_of(&node_dir);
    drop(node);
    let mut node = TestNode::start_on(NAME, &node_dir, &controller, "127.0.0.82");
    assert_eq!(node.terminate(), Some(0), "{}", node.log());
    for parent in &parents {
        assert!(
            !parent.exists(),
            "{} is left: {}",
            parent.display(),
            node.log()
        );
        assert!(
            node.log()
                .contains(&format!("removed its cgroup {}", parent.display())),
            "{}",
            node.log()
        );
    }
    assert_eq!(twin.terminate(), Some(0), "{}", twin.log());
    for parent in &twin_parents {
        assert!(!parent.exists(), "{} is left", parent.display());
    }

    drop(occupant);
    for leftover in [busy.join("vm-runs"), busy, other] {
        let _ = std::fs::remove_dir(leftover);
    }
}
