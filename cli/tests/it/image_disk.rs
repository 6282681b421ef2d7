//! Images with disk content (issue 15 item 5), on a real dev cluster: an image names a
//! qcow2 file; a VM's `from-image=#true` disk is a copy-on-write clone of the base
//! volume the file was imported into (once, with qemu-img, on the disk's nodes), and
//! reads back through its NBD export exactly the image's bytes; a second VM whose disk
//! lands on the same nodes is cloned from the same base without a second import. A
//! missing file, a file that is not qcow2 and a qcow2 file qemu-img cannot read are
//! refused, naming the spec file and line. A file touched without a change imports
//! nothing; a changed file is imported again as a new base version, which new disks
//! are cloned from while the existing ones keep their bytes.

use std::path::Path;
use std::process::Command;

use crate::engine::{Cluster, kvm_usable};

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

fn run(what: &str, command: &mut Command) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An empty 8 MiB qcow2 file.
fn create_qcow2(path: &Path) {
    run(
        "qemu-img create",
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg("8M"),
    );
}

/// The VMs and the image. Both VMs are pinned to lab-1, so their disks' copies go to
/// the same nodes (and share a base).
fn workloads(vms: &[&str], file: &str) -> String {
    let mut text = format!(
        "image \"seed\" builtin=\"cairn-guest\" {{\n    disk \"{file}\" format=\"qcow2\"\n}}\n"
    );
    for vm in vms {
        text.push_str(&format!(
            "\nvm \"{vm}\" tenant=\"dev\" site=\"lab\" {{\n    cpu 1\n    memory \"64MiB\"\n    image \"seed\"\n    disk \"root\" size=\"16MiB\" pool=\"local\" from-image=#true\n    tag \"app\" \"seeded\"\n}}\n"
        ));
    }
    text.push_str(
        "\naffinity \"seeded-on-lab-1\" kind=\"node\" hard=#true {\n    select app=\"seeded\"\n    nodes node=\"lab-1\"\n}\n",
    );
    text
}

fn plan_json(cluster: &Cluster) -> serde_json::Value {
    let out = cluster.cairn(&["plan", ".", "--format", "json"]);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("plan JSON ({e}): {out:?}"))
}

fn actions(plan: &serde_json::Value) -> Vec<(String, String)> {
    plan["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            let name = ["name", "volume", "snapshot"]
                .iter()
                .find_map(|k| s[*k].as_str())
                .unwrap_or_default();
            (
                s["action"].as_str().unwrap_or_default().to_owned(),
                name.to_owned(),
            )
        })
        .collect()
}

/// The disk bytes of the qcow2 file `qcow2` (converted to raw at `out`).
fn raw_bytes(qcow2: &Path, out: &Path) -> Vec<u8> {
    run(
        "qemu-img convert to raw",
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(qcow2)
            .arg(out),
    );
    std::fs::read(out).expect("read the raw bytes")
}

/// The bytes of `vm`'s `root` disk, read through `cairn volume export` with qemu-img.
fn disk_bytes(cluster: &Cluster, vm: &str, out: &Path) -> Vec<u8> {
    let export = cluster.cairn(&["volume", "export", &format!("{vm}/root"), "."]);
    assert_eq!(export.code, 0, "{export:?}");
    let uri = export.stdout.trim().to_owned();
    let _ = std::fs::remove_file(out);
    run(
        "qemu-img convert from the export",
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(out),
    );
    std::fs::read(out).expect("read the disk's bytes")
}

#[test]
fn a_from_image_disk_is_a_clone_of_the_image_imported_once_and_bad_files_name_their_line() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and applying starts VMs");
        return;
    }
    if !have("qemu-img") || !have("qemu-io") {
        eprintln!("skipped: qemu-img and qemu-io (qemu-utils) are not installed");
        return;
    }
    let cluster = Cluster::up_with("image-disk", &["workloads.kdl"]);
    let dir = cluster.path().to_owned();
    let images = dir.join("images");
    std::fs::create_dir_all(&images).expect("images dir");
    let seed = images.join("seed.qcow2");
    let spec = dir.join("workloads.kdl");

    // A missing file: refused, naming workloads.kdl:2.
    std::fs::write(&spec, workloads(&["sa"], "images/seed.qcow2")).expect("write spec");
    let missing = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(
        missing.stderr.contains("nothing was sent")
            && missing.stderr.contains("workloads.kdl:2:10")
            && missing.stderr.contains("cannot be read"),
        "{}",
        missing.stderr
    );
    // Not a qcow2 file.
    std::fs::write(&seed, vec![0x42u8; 65536]).expect("write junk");
    let junk = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(junk.code, 1, "{junk:?}");
    assert!(
        junk.stderr.contains("workloads.kdl:2:10") && junk.stderr.contains("not a qcow2 file"),
        "{}",
        junk.stderr
    );
    // A qcow2 file whose L1 table offset is wrong: the node's qemu-img refuses it, and the
    // failed step names the file and the line.
    create_qcow2(&seed);
    let mut header = std::fs::read(&seed).expect("read seed");
    header[40..48].copy_from_slice(&0x1234u64.to_be_bytes()); // l1_table_offset
    std::fs::write(&seed, &header).expect("break seed");
    let broken = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_ne!(broken.code, 0, "{broken:?}");
    let said = format!("{}{}", broken.stdout, broken.stderr);
    let failed = said
        .lines()
        .find(|l| l.starts_with("failed: import_image"))
        .unwrap_or_else(|| panic!("a failed import_image step: {said}"));
    assert!(
        failed.contains("(named at workloads.kdl:2:10)")
            && failed.contains("Active L1 table offset invalid"),
        "{failed}"
    );
    eprintln!("a broken qcow2: {failed}");

    // The image: 8 MiB qcow2 with two written ranges, the rest a hole.
    std::fs::remove_file(&seed).expect("remove seed");
    create_qcow2(&seed);
    run(
        "qemu-io write",
        Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .args(["-c", "write -q -P 0x5a 0 1M"])
            .args(["-c", "write -q -P 0xc3 3M 640k"])
            .args(["-c", "write -q -P 0x17 8128k 64k"])
            .arg(&seed),
    );
    let expected = raw_bytes(&seed, &dir.join("expected.raw"));
    assert_eq!(expected.len(), 8 << 20);

    let plan = plan_json(&cluster);
    let steps = actions(&plan);
    eprintln!("plan for sa: {steps:?}");
    let base = steps
        .iter()
        .find(|(a, _)| a == "import_image")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("an import step: {steps:?}"));
    assert!(base.starts_with("image-seed-"), "{base}");
    // The failed apply created the broken file's base; the file changed since, so this
    // version gets a base of its own.
    for want in [
        ("create_volume", base.as_str()),
        ("snapshot_volume", base.as_str()),
        ("clone_volume", "sa-root"),
        ("resize_volume", "sa-root"),
        ("create_vm", "sa"),
    ] {
        assert!(
            steps.iter().any(|(a, n)| a == want.0 && n == want.1),
            "{want:?} in {steps:?}"
        );
    }
    let started = std::time::Instant::now();
    let apply = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{apply:?}");
    eprintln!(
        "apply (import, snapshot, clone, VM): {:?}",
        started.elapsed()
    );

    let bytes = disk_bytes(&cluster, "sa", &dir.join("sa.raw"));
    assert_eq!(bytes.len(), 16 << 20, "the clone grown to the disk's size");
    assert!(
        bytes[..8 << 20] == expected[..],
        "sa-root's first 8 MiB differ from the image's"
    );
    // Beyond the image: zeros, but for the last 4 KiB, where the built-in guest's
    // virtio-blk self-test writes (into the clone, never into the base: sb below).
    assert!(
        bytes[8 << 20..(16 << 20) - 4096].iter().all(|b| *b == 0),
        "beyond the image the disk reads zeros"
    );
    let again = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(again.code, 0, "converged: {again:?}");

    // A second VM on the same nodes: cloned from the same base, no second import.
    std::fs::write(&spec, workloads(&["sa", "sb"], "images/seed.qcow2")).expect("write spec");
    let plan = plan_json(&cluster);
    let steps = actions(&plan);
    eprintln!("plan for sb: {steps:?}");
    assert!(
        !steps
            .iter()
            .any(|(a, _)| a == "import_image" || a == "create_volume"),
        "{steps:?}"
    );
    assert!(
        plan["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .any(|s| s["action"] == "clone_volume"
                && s["volume"] == base
                && s["name"] == "sb-root"),
        "sb-root cloned from {base}: {plan:#}"
    );
    let apply = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{apply:?}");
    let sb = disk_bytes(&cluster, "sb", &dir.join("sb.raw"));
    assert!(
        sb[..8 << 20] == expected[..],
        "sb-root differs from the image"
    );
    // The base is kept (its image is in the spec) and shown as no drift.
    let status = cluster.status_json();
    let volumes = status["volumes"].as_array().expect("volumes");
    let row = volumes
        .iter()
        .find(|v| v["name"] == base.as_str())
        .unwrap_or_else(|| panic!("{base} in {volumes:?}"));
    assert_eq!(row["drift"], "none", "{row}");
    let again = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(again.code, 0, "converged: {again:?}");

    // Touched, same bytes (a fresh checkout): nothing to import.
    let bytes_now = std::fs::read(&seed).expect("read seed");
    std::fs::write(&seed, &bytes_now).expect("rewrite seed");
    let again = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(
        again.code, 0,
        "a touched file is the same version: {again:?}"
    );

    // The file changes: a new VM's disk is a clone of a new base holding the new
    // version; sa and sb keep the bytes they were cloned from.
    run(
        "qemu-io write",
        Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .args(["-c", "write -q -P 0x99 2M 256k"])
            .arg(&seed),
    );
    let expected_new = raw_bytes(&seed, &dir.join("expected-new.raw"));
    assert_ne!(expected_new, expected);
    std::fs::write(&spec, workloads(&["sa", "sb", "sc"], "images/seed.qcow2")).expect("write spec");
    let plan = plan_json(&cluster);
    let steps = actions(&plan);
    eprintln!("plan for sc after the file changed: {steps:?}");
    let new_base = steps
        .iter()
        .find(|(a, _)| a == "import_image")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("the new version imported: {steps:?}"));
    assert_ne!(new_base, base);
    assert!(
        plan["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .any(|s| s["action"] == "clone_volume"
                && s["volume"] == new_base.as_str()
                && s["name"] == "sc-root"),
        "sc-root cloned from {new_base}: {plan:#}"
    );
    for vm in ["sa-root", "sb-root"] {
        assert!(
            !steps.iter().any(|(_, n)| n == vm),
            "{vm} untouched: {steps:?}"
        );
    }
    let text = cluster.cairn(&["plan", "."]);
    let changed = text
        .stdout
        .lines()
        .find(|l| l.contains("the disk file changed since"))
        .unwrap_or_else(|| panic!("the plan says the file changed: {}", text.stdout));
    // The base sa and sb were cloned from, and the broken file's (another version).
    assert!(changed.contains(&base), "{changed}");
    let apply = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{apply:?}");
    let sc = disk_bytes(&cluster, "sc", &dir.join("sc.raw"));
    assert!(
        sc[..8 << 20] == expected_new[..],
        "sc-root holds the new version"
    );
    for vm in ["sa", "sb"] {
        let old = disk_bytes(&cluster, vm, &dir.join(format!("{vm}.raw")));
        assert!(
            old[..8 << 20] == expected[..],
            "{vm}-root keeps the version it was cloned from"
        );
    }
    let again = cluster.cairn(&["plan", ".", "--detailed-exitcode"]);
    assert_eq!(again.code, 0, "converged: {again:?}");
}
