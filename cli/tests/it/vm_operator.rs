//! The operator's day-to-day actions on a real dev cluster with a controller (issue
//! 20, item 4): `cairn vm console` shows the built-in guest's serial output and
//! delivers input to it (the guest echoes what it reads), `cairn vm reboot` gives the
//! VM a new boot in the same process, and both are audited with their signer.

use std::io::Write as _;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::ha::{HaCluster, diskless_web, vmm_status};

fn console_with_input(ha: &HaCluster, vm: &str, key: &str, input: &[u8]) -> crate::Run {
    let mut child = ha
        .cluster
        .command(&[
            "vm",
            "console",
            vm,
            "--data-dir",
            ".cairn",
            "--key",
            key,
            "--linger",
            "3s",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cairn vm console runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("type into the console");
    let out = child.wait_with_output().expect("cairn vm console ends");
    crate::Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn audited(status: &Value, action: &str) -> Option<Value> {
    status["audit"]
        .as_array()?
        .iter()
        .find(|e| e["event"] == format!("action-{action}"))
        .cloned()
}

#[test]
fn console_shows_output_and_delivers_input_and_a_reboot_is_a_new_boot_both_audited() {
    let Some(ha) = HaCluster::up_in("vm-operator", diskless_web, None) else {
        return;
    };
    let key = ha.cluster.path().join(".cairn/dev/gitops/operator_ed25519");
    let key = key.to_string_lossy().into_owned();
    let vm = "web-0";
    let socket = ha.vm_dir(vm).join("control.sock");
    let boots =
        |socket: &std::path::Path| vmm_status(socket).and_then(|s| s["boot_count"].as_u64());
    assert_eq!(boots(&socket), Some(1), "{vm} booted once");

    // The console: the banner from before attaching, then the echo of what was typed.
    let console = console_with_input(&ha, vm, &key, b"typed-through-cairn\r");
    assert_eq!(console.code, 0, "{console:?}");
    assert!(
        console.stdout.contains("cairn-guest: up"),
        "the output before attaching: {console:?}"
    );
    assert!(
        console.stdout.contains("typed-through-cairn\r\n"),
        "the guest's echo of the input: {console:?}"
    );
    assert!(
        console
            .stderr
            .contains(&format!("attached to the console of {vm}"))
            && console.stderr.contains("detach with Ctrl-]"),
        "{console:?}"
    );
    let log = std::fs::read_to_string(ha.vm_dir(vm).join("console.log")).expect("console.log");
    assert!(log.contains("typed-through-cairn\r\n"), "{log}");
    let status = ha.status();
    let attached = audited(&status, &format!("console:{vm}"))
        .unwrap_or_else(|| panic!("the console is audited: {:#}", status["audit"]));
    assert!(
        attached["detail"]["signer"]
            .as_str()
            .is_some_and(|s| s.contains("SHA256:")),
        "{attached:#}"
    );

    // The reboot: a new boot in the same VMM process, the banner printed again.
    let pid = crate::ha::vmm_pid(&ha.vm_dir(vm)).expect("its VMM");
    let reboot = ha
        .cluster
        .cairn(&["vm", "reboot", vm, "--data-dir", ".cairn", "--key", &key]);
    assert_eq!(reboot.code, 0, "{reboot:?}");
    assert!(
        reboot.stdout.contains(&format!("{vm} rebooted on")),
        "{reboot:?}"
    );
    assert_eq!(boots(&socket), Some(2), "a new boot");
    assert_eq!(
        crate::ha::vmm_pid(&ha.vm_dir(vm)),
        Some(pid),
        "the same VMM process"
    );
    // The second boot counts before its guest prints: its banner follows (on a loaded
    // machine, CI's, later than this line runs).
    let banners = || {
        let log = std::fs::read_to_string(ha.vm_dir(vm).join("console.log")).expect("console.log");
        (log.matches("cairn-guest: up").count(), log)
    };
    let waiting = std::time::Instant::now();
    while banners().0 < 2 && waiting.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (count, log) = banners();
    assert_eq!(count, 2, "{log}");
    let status = ha.status();
    let rebooted = audited(&status, &format!("reboot:{vm}"))
        .unwrap_or_else(|| panic!("the reboot is audited: {:#}", status["audit"]));
    assert!(
        rebooted["detail"]["signer"]
            .as_str()
            .is_some_and(|s| s.contains("SHA256:")),
        "{rebooted:#}"
    );
    // The desired state is unchanged: nothing to do, the VM still runs where it was.
    let vm_status = status["vms"]
        .as_array()
        .and_then(|vms| vms.iter().find(|v| v["name"] == vm))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(vm_status["state"], "running", "{vm_status:#}");

    // A VM the applied commit does not have: exit 1, saying so.
    let unknown = ha.cluster.cairn(&[
        "vm",
        "reboot",
        "no-such-vm",
        "--data-dir",
        ".cairn",
        "--key",
        &key,
    ]);
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(
        unknown
            .stderr
            .contains("`no-such-vm` is not in the applied commit"),
        "{unknown:?}"
    );
    // Waiting a little keeps the reboot's effect visible in the VMM's own status.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(boots(&socket), Some(2));
}

/// Whether the plan has a `vm db on NODE — VERB` line.
fn plan_line(plan: &str, verb: &str) -> bool {
    plan.lines()
        .any(|l| l.contains("vm db on") && l.trim_end().ends_with(&format!("— {verb}")))
}

fn vm_row(status: &Value, vm: &str) -> Value {
    status["vms"]
        .as_array()
        .and_then(|vms| vms.iter().find(|v| v["name"] == vm))
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn power_off_stops_a_vm_and_keeps_it_defined_and_removing_it_starts_it_again() {
    if !crate::engine::kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and the test runs VMs");
        return;
    }
    let cluster = crate::engine::Cluster::up("power-off");
    let applied = cluster.cairn_unattended(&["apply", ".", "--auto-approve"]);
    assert_eq!(applied.code, 0, "{applied:?}");
    let status = cluster.status_json();
    let row = vm_row(&status, "db");
    assert_eq!(row["state"], "running", "{row:#}");
    let node = row["node"].as_str().expect("db's node").to_owned();
    let vm_dir = cluster.path().join(".cairn/dev").join(&node).join("vms/db");
    let socket = vm_dir.join("control.sock");
    let pid = crate::ha::vmm_pid(&vm_dir).expect("db's VMM");
    let beats =
        |socket: &std::path::Path| vmm_status(socket).and_then(|s| s["heartbeat_total"].as_u64());
    assert!(beats(&socket).is_some_and(|b| b > 0), "db's guest beats");

    // power "off": the plan stops it, and only that.
    let workloads = cluster.path().join("workloads.kdl");
    let original = std::fs::read_to_string(&workloads).expect("workloads.kdl");
    let off = original.replace(
        "vm \"db\" tenant=\"dev\" site=\"lab\" {\n",
        "vm \"db\" tenant=\"dev\" site=\"lab\" {\n    power \"off\"\n",
    );
    assert_ne!(off, original, "db's block found");
    std::fs::write(&workloads, &off).expect("write workloads.kdl");
    let plan = cluster.cairn(&["plan", "."]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(
        plan_line(&plan.stdout, "stop") && plan.stdout.contains("power \"off\" in its spec"),
        "{plan:?}"
    );
    assert!(
        plan.stdout.contains("0 to add, 1 to change, 0 to destroy"),
        "only db stops: {plan:?}"
    );
    let applied = cluster.cairn_unattended(&["apply", ".", "--auto-approve"]);
    assert_eq!(applied.code, 0, "{applied:?}");
    assert!(!crate::ha::alive(pid), "db's VMM ended");
    assert_eq!(beats(&socket), None, "no heartbeat: nothing answers");
    let row = vm_row(&cluster.status_json(), "db");
    assert_eq!(row["state"], "stopped", "{row:#}");
    assert_eq!(
        row["drift"], "none",
        "stopped is what the spec says: {row:#}"
    );
    assert_eq!(row["node"], node.as_str(), "kept on its node: {row:#}");
    assert!(vm_dir.join("vm-config.json").exists(), "still defined");
    let again = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(again.code, 0, "nothing to do once stopped: {again:?}");

    // Without it, the plan starts the VM again: a new process, the guest beats.
    std::fs::write(&workloads, &original).expect("write workloads.kdl");
    let plan = cluster.cairn(&["plan", "."]);
    assert!(plan_line(&plan.stdout, "start"), "{plan:?}");
    let applied = cluster.cairn_unattended(&["apply", ".", "--auto-approve"]);
    assert_eq!(applied.code, 0, "{applied:?}");
    let row = vm_row(&cluster.status_json(), "db");
    assert_eq!(row["state"], "running", "{row:#}");
    let started = crate::ha::vmm_pid(&vm_dir).expect("db's VMM again");
    assert_ne!(started, pid);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while beats(&socket).is_none_or(|b| b == 0) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        beats(&socket).is_some_and(|b| b > 0),
        "db's guest beats again"
    );
    let log = std::fs::read_to_string(vm_dir.join("console.log")).expect("console.log");
    assert_eq!(log.matches("cairn-guest: up").count(), 2, "{log}");
}
