//! Safety of plan and apply against a real dev cluster: nothing destroyed by
//! mistake, nothing skipped in silence. Each test reproduces one way the spine
//! used to lose data or report success while doing nothing.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;

use crate::engine::{Cluster, kvm_usable};

/// Rewrites one spec file of the cluster: `from` must occur in it.
fn edit(cluster: &Cluster, file: &str, from: &str, to: &str) {
    let path = cluster.path().join(file);
    let text = std::fs::read_to_string(&path).expect("read spec");
    assert!(text.contains(from), "{file} has no `{from}`");
    std::fs::write(&path, text.replacen(from, to, 1)).expect("write spec");
}

fn set_web_replicas(cluster: &Cluster, from: u32, to: u32) {
    edit(
        cluster,
        "workloads.kdl",
        &format!("replicas={from}"),
        &format!("replicas={to}"),
    );
}

fn apply(cluster: &Cluster) -> crate::Run {
    cluster.cairn(&["apply", ".", "--auto-approve"])
}

fn vm_names(status: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = status["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

fn volume_names(status: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = status["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

/// Starts `cairn apply --auto-approve` one step at a time and kills it (SIGKILL)
/// right after `after` steps were reported done.
fn apply_and_kill_after(cluster: &Cluster, after: usize, parallelism: &str) -> usize {
    let mut child = cluster
        .command(&["apply", ".", "--auto-approve", "--parallelism", parallelism])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cairn apply starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut done = 0;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if line.starts_with("ok: ") || line.starts_with("ok (") {
            done += 1;
            if done == after {
                break;
            }
        }
    }
    child.kill().expect("kill -9 cairn apply");
    child.wait().expect("reap");
    done
}

#[test]
fn an_interrupted_scale_down_is_not_resumed_once_the_specs_want_the_vms_again() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and applying the quickstart starts VMs");
        return;
    }
    let cluster = Cluster::up("stale-resume");
    set_web_replicas(&cluster, 3, 6);
    let up = apply(&cluster);
    assert_eq!(up.code, 0, "{up:?}");
    let before = cluster.status_json();
    assert_eq!(vm_names(&before).len(), 8, "{before}");

    // Scale down to 3 and kill the apply after its first step.
    set_web_replicas(&cluster, 6, 3);
    let done = apply_and_kill_after(&cluster, 1, "1");
    assert_eq!(done, 1);

    // The operator changes their mind: 6 again. An apply with nobody to ask
    // must not carry out the old plan's deletes.
    set_web_replicas(&cluster, 3, 6);
    let run = cluster.cairn_unattended(&["apply", "."]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("was interrupted"), "{run:?}");
    assert!(run.stdout.contains("The specs changed since"), "{run:?}");
    assert!(run.stderr.contains("stdin is not a terminal"), "{run:?}");
    assert!(!run.stdout.contains("delete_vm"), "{run:?}");

    let after = cluster.status_json();
    assert_eq!(vm_names(&after), vm_names(&before), "{after}");
    assert_eq!(volume_names(&after), volume_names(&before), "{after}");
    // What is left to do is to start again what the first step stopped.
    let plan = cluster.cairn(&["plan", ".", "--concise", "--detailed-exitcode"]);
    assert_eq!(plan.code, 3, "{plan:?}");
    assert!(plan.stdout.contains("— start"), "{}", plan.stdout);
    assert!(!plan.stdout.contains("delete"), "{}", plan.stdout);
    let fixed = apply(&cluster);
    assert_eq!(fixed.code, 0, "{fixed:?}");
    for vm in cluster.status_json()["vms"].as_array().unwrap() {
        assert_eq!(vm["state"], "running", "{vm}");
    }
}

#[test]
fn scaling_back_to_an_earlier_state_is_carried_out_every_time() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and applying the quickstart starts VMs");
        return;
    }
    let cluster = Cluster::up("scale-3434");
    assert_eq!(apply(&cluster).code, 0);
    let mut replicas = 3;
    for target in [4, 3, 4] {
        set_web_replicas(&cluster, replicas, target);
        replicas = target;
        let run = apply(&cluster);
        assert_eq!(run.code, 0, "{run:?}");
        assert!(
            run.stdout.contains("0 already done by the node"),
            "a plan applied again must be carried out again: {}",
            run.stdout
        );
        assert!(!run.stdout.contains("18446744073709551"), "{}", run.stdout);
        let status = cluster.status_json();
        let webs = vm_names(&status)
            .into_iter()
            .filter(|n| n.starts_with("web-"))
            .count();
        assert_eq!(webs, target as usize, "{status}");
        let plan = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
        assert_eq!(plan.code, 0, "converged at {target}: {plan:?}");
    }
}

#[test]
fn a_spec_mistake_never_deletes_a_running_vm_or_its_data() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and applying the quickstart starts VMs");
        return;
    }
    let cluster = Cluster::up("mistake");
    assert_eq!(apply(&cluster).code, 0);
    let before = cluster.status_json();

    // A memory typo (with a quota to match): no node can hold the web VMs any more.
    edit(
        &cluster,
        "tenants.kdl",
        "memory=\"1GiB\"",
        "memory=\"128GiB\"",
    );
    edit(
        &cluster,
        "workloads.kdl",
        "memory \"64MiB\"",
        "memory \"8GiB\"",
    );
    let validate = cluster.cairn(&["validate", "."]);
    assert_eq!(validate.code, 1, "{validate:?}");
    let plan = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(plan.code, 1, "{plan:?}");
    assert!(!plan.stdout.contains("delete"), "{}", plan.stdout);
    assert!(
        plan.stdout.contains("! vm web-0 cannot be placed"),
        "{plan:?}"
    );
    assert!(
        plan.stdout.contains("it stays where it runs"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stderr.contains("cairn::place::unplaced") && plan.stderr.contains("workloads.kdl"),
        "the reason is a located diagnostic: {}",
        plan.stderr
    );
    let run = apply(&cluster);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("refusing to apply"), "{}", run.stderr);
    assert!(run.stderr.contains("nothing was sent"), "{}", run.stderr);
    let after = cluster.status_json();
    assert_eq!(vm_names(&after), vm_names(&before));
    assert_eq!(volume_names(&after), volume_names(&before));
    for web in after["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["name"].as_str().unwrap().starts_with("web-"))
    {
        assert_eq!(web["state"], "running", "{web}");
        assert_eq!(web["drift"], "unplaced", "{web}");
    }

    // Shrinking a volume is refused, growing it is done in place.
    edit(
        &cluster,
        "workloads.kdl",
        "memory \"8GiB\"",
        "memory \"64MiB\"",
    );
    edit(
        &cluster,
        "workloads.kdl",
        "disk \"data\" size=\"256MiB\"",
        "disk \"data\" size=\"128MiB\"",
    );
    let shrink = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(shrink.code, 1, "{shrink:?}");
    assert!(
        shrink
            .stdout
            .contains("shrinking it from 256MiB to 128MiB would lose data"),
        "{}",
        shrink.stdout
    );
    let run = apply(&cluster);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(volume_names(&cluster.status_json()), volume_names(&before));

    edit(
        &cluster,
        "workloads.kdl",
        "disk \"data\" size=\"128MiB\"",
        "disk \"data\" size=\"512MiB\"",
    );
    let grow = cluster.cairn(&["plan", ".", "--concise", "--detailed-exitcode"]);
    assert_eq!(grow.code, 3, "{grow:?}");
    assert!(
        grow.stdout.contains("~   volume db-data on "),
        "{}",
        grow.stdout
    );
    assert!(!grow.stdout.contains("delete"), "{}", grow.stdout);
    let run = apply(&cluster);
    assert_eq!(run.code, 0, "{run:?}");
    let status = cluster.status_json();
    let volume = status["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "db-data")
        .unwrap()
        .clone();
    assert_eq!(volume["size_bytes"], 512u64 << 20, "{volume}");
    let plan = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(plan.code, 0, "{plan:?}");
}

#[test]
fn an_unplaceable_new_vm_is_not_reported_as_converged() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and applying the quickstart starts VMs");
        return;
    }
    let cluster = Cluster::up("unplaced");
    assert_eq!(apply(&cluster).code, 0);
    let mut workloads = std::fs::read_to_string(cluster.path().join("workloads.kdl")).unwrap();
    workloads.push_str(
        "\nvm \"huge\" tenant=\"ops\" site=\"lab\" {\n    cpu 1\n    memory \"32GiB\"\n    image \"tiny\"\n}\n",
    );
    std::fs::write(cluster.path().join("workloads.kdl"), workloads).unwrap();
    edit(
        &cluster,
        "tenants.kdl",
        "memory=\"512MiB\"",
        "memory=\"64GiB\"",
    );
    let plan = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(plan.code, 1, "{plan:?}");
    assert!(
        !plan.stdout.contains("matches the specs"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout.contains("! vm huge cannot be placed"),
        "{}",
        plan.stdout
    );
}

#[test]
fn a_changed_image_replaces_the_vm_and_a_missing_one_stops_apply_before_any_step() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and applying the quickstart starts VMs");
        return;
    }
    let cluster = Cluster::up("image");
    assert_eq!(apply(&cluster).code, 0);
    // A kernel file that is not a kernel: the VM is replaced, and its start
    // fails with the VMM's own error instead of "succeeding".
    std::fs::write(cluster.path().join("not-a-kernel"), vec![0u8; 8192]).unwrap();
    let mut workloads = std::fs::read_to_string(cluster.path().join("workloads.kdl")).unwrap();
    workloads.push_str("\nimage \"broken\" {\n    kernel \"not-a-kernel\"\n}\n");
    std::fs::write(cluster.path().join("workloads.kdl"), workloads).unwrap();
    let db_image = "image \"tiny\"\n    disk \"data\"";
    edit(
        &cluster,
        "workloads.kdl",
        db_image,
        "image \"broken\"\n    disk \"data\"",
    );
    let plan = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(plan.code, 3, "{plan:?}");
    assert!(plan.stdout.contains("-/+ vm db on "), "{}", plan.stdout);
    assert!(
        plan.stdout
            .contains("image cairn-guest (built in) → kernel "),
        "{}",
        plan.stdout
    );
    let run = apply(&cluster);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout.contains("failed:  start_vm db@"),
        "the start step fails with the VMM's error: {}",
        run.stdout
    );

    // A kernel file that does not exist: nothing is sent at all.
    std::fs::remove_file(cluster.path().join("not-a-kernel")).unwrap();
    let audit_before = cluster.status_json()["audit"].clone();
    let run = apply(&cluster);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("images the plan needs are missing"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("not-a-kernel"), "{}", run.stderr);
    let audit = cluster.status_json()["audit"].clone();
    let last = audit.as_array().unwrap().last().unwrap();
    assert_eq!(
        last["event"], "apply-refused",
        "{audit} (before: {audit_before})"
    );
}

#[test]
fn force_unlock_refuses_a_live_holder_and_says_who_it_is() {
    let cluster = Cluster::up("unlock-live");
    // Any plan with steps holds the lock while it runs; the test delay keeps
    // each step's outcome for 2 s.
    let mut child = cluster
        .command(&["apply", ".", "--auto-approve", "--parallelism", "1"])
        .env("CAIRN_APPLY_STEP_DELAY_MS", "2000")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cairn apply starts");
    // Once it reports a step, it holds the lock.
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.starts_with("ok: "))),
        "the first apply reported no step"
    );
    // The second apply is refused with the holder's lock id.
    let id = loop {
        let second = cluster.cairn(&["apply", ".", "--auto-approve"]);
        if let Some(rest) = second.stderr.split("locked by apply ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the first apply ended before the lock was seen: {second:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let refused = cluster.cairn(&["force-unlock", &id, "."]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("still running"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains(&format!("pid {}", child.id())),
        "{}",
        refused.stderr
    );
    let forced = cluster.cairn(&["force-unlock", &id, ".", "--force"]);
    assert_eq!(forced.code, 0, "{forced:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The exactly-once crash test: a 40-step plan is killed with SIGKILL at a
/// random step (with up to 8 steps in flight), 20 times, alternating between making and removing the VMs.
/// After each interruption the next apply finishes the job; the nodes' own
/// per-object counters then show every effect happened exactly once: each VM
/// was started once per round that made it, each volume created once per
/// round that made it.
#[test]
fn kill_9_at_random_steps_of_a_40_step_plan_carries_out_every_effect_exactly_once() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and these plans start VMs");
        return;
    }
    let cluster = Cluster::up_with("crash-40", &["workloads.kdl"]);
    let fleet = "tenant \"crash\" {\n    quota vcpus=32 memory=\"2GiB\" storage=\"4GiB\" vms=16\n    network \"crash-net\" site=\"lab\" cidr=\"10.79.0.0/24\" gateway=\"10.79.0.1\"\n}\n";
    // 12 VMs with a volume (create_volume, create_vm, start_vm) and 2 without
    // (create_vm, start_vm): 40 steps to make, 40 to remove (stop, delete, and
    // delete_volume).
    let group = "vm-group \"w\" tenant=\"crash\" site=\"lab\" replicas=12 {\n    cpu 1\n    memory \"32MiB\"\n    image \"tiny\"\n    disk \"root\" size=\"16MiB\" pool=\"local\"\n}\nvm-group \"x\" tenant=\"crash\" site=\"lab\" replicas=2 {\n    cpu 1\n    memory \"32MiB\"\n    image \"tiny\"\n}\n";
    std::fs::write(cluster.path().join("fleet.kdl"), fleet).unwrap();
    // The bonds first, so that every round's plan is VMs and volumes only.
    assert_eq!(apply(&cluster).code, 0);
    let mut seed: u64 = std::env::var("CAIRN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash test seed: {seed} (CAIRN_CRASH_SEED={seed} repeats it)");
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut rounds_made = 0u64;
    for round in 0..20 {
        let making = round % 2 == 0;
        if making {
            std::fs::write(cluster.path().join("group.kdl"), group).unwrap();
        } else {
            std::fs::remove_file(cluster.path().join("group.kdl")).unwrap();
        }
        let plan = cluster.cairn(&["plan", ".", "--format", "json"]);
        let doc: serde_json::Value = serde_json::from_str(&plan.stdout).expect("plan JSON");
        let steps = doc["steps"].as_array().unwrap().len();
        assert_eq!(steps, 40, "round {round}: {}", plan.stdout);
        let kill_after = 1 + (next() % (steps as u64 - 2)) as usize;
        let done = apply_and_kill_after(&cluster, kill_after, "8");
        eprintln!("round {round}: killed after {done} of {steps} steps");
        let finish = cluster.cairn_unattended(&["apply", "."]);
        assert_eq!(finish.code, 0, "round {round}: {finish:?}");
        if making {
            rounds_made += 1;
        }
        let status = cluster.status_json();
        let ws: Vec<&serde_json::Value> = status["vms"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| {
                let name = v["name"].as_str().unwrap();
                name.starts_with("w-") || name.starts_with("x-")
            })
            .collect();
        let vols: Vec<&serde_json::Value> = status["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["name"].as_str().unwrap().starts_with("w-"))
            .collect();
        if making {
            assert_eq!(ws.len(), 14, "round {round}: {status}");
            assert_eq!(vols.len(), 12, "round {round}: {status}");
            for vm in &ws {
                assert_eq!(vm["state"], "running", "round {round}: {vm}");
                assert_eq!(
                    vm["starts"], rounds_made,
                    "round {round}: every VM is started exactly once per round that made it: {vm}"
                );
            }
            for v in &vols {
                assert_eq!(
                    v["generation"], rounds_made,
                    "round {round}: every volume is created exactly once per round that made it: {v}"
                );
            }
        } else {
            assert!(ws.is_empty(), "round {round}: {status}");
            assert!(vols.is_empty(), "round {round}: {status}");
        }
        let plan = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
        assert_eq!(plan.code, 0, "round {round}: converged: {plan:?}");
    }
}

fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn volume_export_prints_an_owner_only_nbd_unix_uri_that_expires() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and applying the quickstart starts VMs");
        return;
    }
    let cluster = Cluster::up("export");
    assert_eq!(apply(&cluster).code, 0);
    let wrong = cluster.cairn(&["volume", "export", "db/nope", "."]);
    assert_eq!(wrong.code, 1, "{wrong:?}");
    assert!(
        wrong.stderr.contains("has no disk `nope`; its disks: data"),
        "{}",
        wrong.stderr
    );
    let run = cluster.cairn(&["volume", "export", "db/data", ".", "--lifetime", "4s"]);
    assert_eq!(run.code, 0, "{run:?}");
    let uri = run.stdout.trim().to_owned();
    assert!(uri.starts_with("nbd+unix:///db-data?socket="), "{uri}");
    let socket = uri.split("socket=").nth(1).unwrap().to_owned();
    assert!(Path::new(&socket).exists(), "{socket}");
    if have("nbdinfo") {
        let owner = std::process::Command::new("nbdinfo")
            .args(["--size", &uri])
            .output()
            .unwrap();
        assert!(owner.status.success(), "{owner:?}");
        assert_eq!(
            String::from_utf8_lossy(&owner.stdout).trim(),
            (256u64 << 20).to_string()
        );
        if have("runuser") && is_root() {
            let nobody = std::process::Command::new("runuser")
                .args(["-u", "nobody", "--", "nbdinfo", "--size", &uri])
                .output()
                .unwrap();
            assert!(
                !nobody.status.success(),
                "nobody read the export: {nobody:?}"
            );
        } else {
            eprintln!("skipped the `nobody` check: not root or no runuser");
        }
    } else {
        eprintln!("skipped the client checks: nbdinfo (libnbd-bin) is not installed");
    }
    // The lifetime ends: the socket goes away.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while Path::new(&socket).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        !Path::new(&socket).exists(),
        "{socket} outlived its lifetime"
    );
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn prevent_destroy_keeps_a_volume_even_after_its_disk_leaves_the_spec() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and applying the quickstart starts VMs");
        return;
    }
    let cluster = Cluster::up("prevent-destroy");
    edit(
        &cluster,
        "workloads.kdl",
        "disk \"data\" size=\"256MiB\" pool=\"local\"",
        "disk \"data\" size=\"256MiB\" pool=\"local\" prevent-destroy=#true",
    );
    assert_eq!(apply(&cluster).code, 0);
    // The whole VM leaves the spec, protection and all: its volume is kept.
    let text = std::fs::read_to_string(cluster.path().join("workloads.kdl")).unwrap();
    let start = text.find("vm \"db\"").unwrap();
    let end = start + text[start..].find("\n}\n").unwrap() + 3;
    std::fs::write(
        cluster.path().join("workloads.kdl"),
        format!("{}{}", &text[..start], &text[end..]),
    )
    .unwrap();
    let plan = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(plan.code, 1, "{plan:?}");
    assert!(
        plan.stdout
            .contains("! volume db-data on lab-1: refused: no spec names it any more, but it is protected by `prevent-destroy`")
            || plan.stdout.contains("refused: no spec names it any more, but it is protected"),
        "{}",
        plan.stdout
    );
    let run = apply(&cluster);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(volume_names(&cluster.status_json()).contains(&"db-data".to_owned()));
}

#[test]
fn plan_files_are_verified_before_anything_is_written_and_broken_ones_exit_1() {
    let dir = crate::TempDir::new("planfile");
    let elsewhere = crate::TempDir::new("planfile-root");
    let file = dir.0.join("bad.plan");
    std::fs::write(&file, "{ this is not json").unwrap();
    let run = crate::cairn(&dir.0, &["apply", "bad.plan"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("is not a cairn plan file"),
        "{}",
        run.stderr
    );
    // A plan file naming another spec root: refused, and nothing (no controller
    // key) is written there.
    std::fs::write(
        &file,
        serde_json::json!({"format_version": 1, "kind": "cairn-plan", "spec_root": elsewhere.0, "plan": {}})
            .to_string(),
    )
    .unwrap();
    let run = crate::cairn(&dir.0, &["apply", "bad.plan"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("has no controller key"),
        "{}",
        run.stderr
    );
    assert!(
        !elsewhere.0.join(".cairn").exists(),
        "apply wrote into the spec root a forged plan file named"
    );
}

#[test]
fn a_corrupt_state_file_says_how_to_recover() {
    let dir = crate::TempDir::new("corrupt-state");
    crate::copy_dir(&crate::repo_root().join("examples/quickstart"), &dir.0);
    std::fs::create_dir_all(dir.0.join(".cairn")).unwrap();
    std::fs::write(dir.0.join(".cairn/state.redb"), vec![0x5a; 4096]).unwrap();
    let run = crate::cairn(&dir.0, &["status", "."]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("move the file aside"), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("placement will be rebuilt from what the nodes run"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_vm_running_with_other_memory_than_its_spec_is_drift_in_status_and_plan() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and applying the quickstart starts VMs");
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    // A cairn-vmm that runs every VM with 48 MiB, whatever its node asked for:
    // the VMM reports what it runs, and status must show it.
    let tools = crate::TempDir::new("resizing-vmm");
    let real = crate::engine::node_binaries().join("cairn-vmm");
    let wrapper = tools.0.join("cairn-vmm");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n[ \"$1\" = --config ] || exec {real} \"$@\"\nsed -e 's/\"memory_bytes\": *[0-9]*/\"memory_bytes\": {}/' \"$2\" > \"$2.vmm\" || exit 2\nexec {real} --config \"$2.vmm\"\n",
            48u64 << 20,
            real = real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cluster = Cluster::up_with_env(
        "memory-drift",
        &[],
        &[("CAIRN_VMM_BIN", wrapper.to_str().unwrap())],
    );
    assert_eq!(apply(&cluster).code, 0);
    let status = cluster.status_json();
    let db = status["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "db")
        .unwrap()
        .clone();
    assert_eq!(db["state"], "running", "{db}");
    assert_eq!(db["drift"], "definition", "{db}");
    assert_eq!(db["detail"][0], "memory 48MiB → 128MiB", "{db}");
    let text = cluster.cairn(&["status", "."]);
    assert!(text.stdout.contains("definition"), "{}", text.stdout);
    let plan = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(plan.code, 3, "{plan:?}");
    assert!(plan.stdout.contains("-/+ vm db on "), "{}", plan.stdout);
    assert!(
        plan.stdout.contains("memory 48MiB → 128MiB"),
        "{}",
        plan.stdout
    );
}

#[test]
fn apply_is_gated_by_the_spec_roots_policies() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and applying the quickstart starts VMs");
        return;
    }
    let cluster = Cluster::up("policy-gate");
    std::fs::create_dir_all(cluster.path().join("policies")).unwrap();
    std::fs::write(
        cluster.path().join("policies/no_deletes.rego"),
        "# METADATA\n# title: No deletes\n# custom:\n#   enforcement: hard-mandatory\npackage cairn.no_deletes\n\nimport rego.v1\n\ndeny contains msg if {\n\tsome c in input.plan.changes\n\tc.kind == \"delete\"\n\tmsg := sprintf(\"the plan deletes %s %s\", [c.object, c.name])\n}\n",
    )
    .unwrap();
    assert_eq!(apply(&cluster).code, 0, "creating passes the policy");
    // Removing the backup VM deletes it: the policy refuses, nothing is sent.
    let text = std::fs::read_to_string(cluster.path().join("workloads.kdl")).unwrap();
    let start = text.find("vm \"backup\"").unwrap();
    let end = start + text[start..].find("\n}\n").unwrap() + 3;
    std::fs::write(
        cluster.path().join("workloads.kdl"),
        format!("{}{}", &text[..start], &text[end..]),
    )
    .unwrap();
    let run = apply(&cluster);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("the policies in") && run.stderr.contains("deny this plan"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("the plan deletes vm backup"),
        "{}",
        run.stderr
    );
    assert!(vm_names(&cluster.status_json()).contains(&"backup".to_owned()));
}
