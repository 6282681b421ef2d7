//! Runtime preemption, end to end (issue 20): a node under real memory pressure stops
//! its spot VM, and the controller places it again on a node with room, with events
//! that say what happened. The pressure is a file in /dev/shm, as in the node's own
//! preemption test; only lab-1 is told to preempt (a `cairn-node` wrapper adds
//! `--preempt-below-available` to it), since every dev node shares this host's memory.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ha::HaCluster;
use crate::ha_timers::get;

fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// A file in /dev/shm (it lowers MemAvailable), removed when dropped.
struct Pressure(PathBuf);

impl Drop for Pressure {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The quickstart with its spot VM `backup` replaced by a diskless spot VM `batch`
/// that prefers lab-1 (a soft affinity: it may go elsewhere).
pub(crate) fn spot_on_lab_1(dir: &Path) {
    let path = dir.join("workloads.kdl");
    let text = std::fs::read_to_string(&path).expect("read workloads.kdl");
    let start = text
        .find("vm \"backup\"")
        .expect("backup in the quickstart");
    let end = start + text[start..].find("\n}\n").expect("backup's block ends") + 3;
    let batch = "vm \"batch\" tenant=\"ops\" site=\"lab\" {\n    cpu 1\n    memory \"64MiB\"\n    sla \"spot\"\n    image \"tiny\"\n    tag \"app\" \"batch\"\n}\n\naffinity \"batch-on-lab-1\" kind=\"node\" hard=#false weight=100 {\n    select app=\"batch\"\n    nodes node=\"lab-1\"\n}\n";
    let text = format!("{}{batch}{}", &text[..start], &text[end..]);
    std::fs::write(&path, text).expect("write workloads.kdl");
}

pub(crate) fn vm_row(status: &Value, vm: &str) -> Option<Value> {
    status["vms"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == vm)
        .cloned()
}

/// The controller's `preempted` events say that lab-1 stopped batch (`noted`, its
/// reason starting with `noted`) and that batch is started on `moved_to`.
pub(crate) fn assert_preemption_events(ha: &HaCluster, noted: &str, moved_to: &str) {
    let events: Value =
        serde_json::from_str(&get(ha, "/api/v1/events?kind=preempted")).unwrap_or(Value::Null);
    let events = events.as_array().cloned().unwrap_or_default();
    let said = |result: &str, text: &str| {
        events.iter().any(|e| {
            e["result"] == result && e["reason"].as_str().is_some_and(|r| r.contains(text))
        })
    };
    assert!(said("noted", noted), "{events:#?}");
    assert!(
        said(
            "re-placing",
            &format!("vm batch, preempted on lab-1, is started on {moved_to}")
        ),
        "{events:#?}"
    );
}

/// Every VM but batch is on the node it was placed on at the start.
pub(crate) fn assert_others_stayed(ha: &HaCluster, status: &Value) {
    for (vm, node) in &ha.placement {
        if vm != "batch" {
            assert_eq!(
                vm_row(status, vm).map(|r| r["node"].clone()),
                Some(Value::from(node.as_str())),
                "{vm} stayed"
            );
        }
    }
}

/// A `cairn-node` wrapper in `scratch` that adds `flags` (shell words) to lab-1's
/// command line only, with `cairn-vmm` beside it (`dev up` wants it there).
pub(crate) fn lab_1_node_wrapper(scratch: &Path, flags: &str) -> PathBuf {
    let wrapper = scratch.join("cairn-node");
    let real = crate::engine::node_binaries().join("cairn-node");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do\n  if [ \"$a\" = lab-1 ]; then exec {real} \"$@\" {flags}; fi\ndone\nexec {real} \"$@\"\n",
            real = real.display(),
        ),
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::symlink(
        crate::engine::node_binaries().join("cairn-vmm"),
        scratch.join("cairn-vmm"),
    )
    .expect("cairn-vmm beside the wrapper");
    wrapper
}

#[test]
fn a_spot_vm_preempted_under_memory_pressure_is_started_again_on_a_node_with_room() {
    if !Path::new("/dev/shm").is_dir() {
        eprintln!("skipped: no /dev/shm to make memory pressure with");
        return;
    }
    let scratch = std::env::temp_dir().join(format!("g-preempt-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let threshold = scratch.join("threshold");
    let wrapper = lab_1_node_wrapper(
        &scratch,
        &format!(
            "--preempt-below-available \"$(cat {})\"",
            threshold.display()
        ),
    );
    // Preempt below 1 GiB less than what is available now; 2 GiB of pressure cross it.
    let below = mem_available().saturating_sub(1 << 30);
    std::fs::write(&threshold, below.to_string()).expect("threshold");
    let Some(ha) = HaCluster::up_with_binaries("g-preempt", spot_on_lab_1, None, Some(wrapper))
    else {
        let _ = std::fs::remove_dir_all(&scratch);
        return;
    };
    assert_eq!(ha.node_of("batch"), "lab-1", "{:?}", ha.placement);

    let pressure = Pressure(PathBuf::from(format!(
        "/dev/shm/g-pressure-{}",
        std::process::id()
    )));
    let path = pressure.0.clone();
    let writer = std::thread::spawn(move || {
        std::process::Command::new("dd")
            .args([
                "if=/dev/zero",
                &format!("of={}", path.display()),
                "bs=1M",
                "count=2048",
            ])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let crossed = loop {
        if mem_available() < below {
            break Instant::now();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let node_log = std::fs::read_to_string(ha.cluster.path().join(".cairn/dev/lab-1/node.log"))
        .unwrap_or_default();
    assert!(
        node_log.contains("spot VMs are preempted while less than"),
        "lab-1 was told to preempt: {node_log}"
    );
    let moved_to = ha.wait(
        "batch running on another node",
        Duration::from_secs(60),
        |s| {
            let row = vm_row(s, "batch")?;
            (row["state"] == "running" && row["node"] != "lab-1")
                .then(|| row["node"].as_str().unwrap_or_default().to_owned())
        },
    );
    let took = crossed.elapsed();
    assert!(writer.join().expect("dd"), "2 GiB written to /dev/shm");
    drop(pressure);

    assert_preemption_events(&ha, "vm batch was stopped by lab-1 (preempted: ", &moved_to);
    // The node that preempted it keeps no copy; the other VMs did not move.
    let status = ha.status();
    let rows = status["vms"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        rows.iter().filter(|v| v["name"] == "batch").count(),
        1,
        "{rows:#?}"
    );
    assert_others_stayed(&ha, &status);
    eprintln!(
        "preemption re-placed: available memory crossed {} MiB; batch running on {moved_to} {:.0} ms later",
        below >> 20,
        took.as_secs_f64() * 1000.0
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
