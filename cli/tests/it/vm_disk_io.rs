//! `cairn vm disk-io`: what it refuses before it asks any node, and what it says when
//! the VM runs nowhere. (The guest's I/O itself is tested through the node API in
//! node-runtime/tests/it/guest_io.rs and through the VMM in vmm/tests/it/guest_io.rs.)

use crate::{TempDir, cairn, copy_dir, repo_root};

#[test]
fn disk_io_names_what_is_wrong_with_its_arguments_and_where_the_vm_is_not() {
    let tmp = TempDir::new("vm-disk-io");
    let specs = tmp.0.join("quickstart");
    copy_dir(&repo_root().join("examples/quickstart"), &specs);
    let dir = specs.to_str().expect("utf-8 path");
    let run = |args: &[&str]| {
        let mut all = vec!["vm", "disk-io"];
        all.extend_from_slice(args);
        cairn(&tmp.0, &all)
    };

    let bad = run(&["db", "checksum", dir, "--disk", "data", "--length", "12x"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("--length 12x"), "{}", bad.stderr);

    let op = run(&["db", "scribble", dir, "--disk", "data"]);
    assert_eq!(
        op.code, 2,
        "an unknown operation is a usage error: {}",
        op.stderr
    );

    let vm = run(&["nodb", "checksum", dir, "--disk", "data"]);
    assert_eq!(vm.code, 1, "{}", vm.stderr);
    assert!(vm.stderr.contains("no vm `nodb`"), "{}", vm.stderr);

    let disk = run(&["db", "write-pattern", dir, "--disk", "logs"]);
    assert_eq!(disk.code, 1, "{}", disk.stderr);
    assert!(
        disk.stderr
            .contains("has no disk `logs`; its disks: data (0)"),
        "{}",
        disk.stderr
    );
    let index = run(&["db", "write-pattern", dir, "--disk", "1"]);
    assert_eq!(index.code, 1, "disk indexes start at 0: {}", index.stderr);

    // No node of the spec runs here: by name or by index, the VM is found nowhere.
    for disk in ["data", "0"] {
        let nowhere = run(&["db", "checksum", dir, "--disk", disk]);
        assert_eq!(nowhere.code, 1, "{}", nowhere.stderr);
        assert!(
            nowhere
                .stderr
                .contains("vm `db` is not running on any node that answered"),
            "{}",
            nowhere.stderr
        );
    }
}

/// `cairn vm disk-io … --disk DISK`: the guest's CRC-32C (`crc32c 0x…`).
fn guest_crc(cluster: &crate::engine::Cluster, args: &[&str]) -> u32 {
    let mut all = vec!["vm", "disk-io"];
    all.extend_from_slice(args);
    let out = cluster.cairn(&all);
    assert_eq!(out.code, 0, "vm disk-io {args:?}: {out:?}");
    let hex = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("crc32c 0x"))
        .unwrap_or_else(|| panic!("no crc32c in {}", out.stdout));
    u32::from_str_radix(hex.trim(), 16).expect("hex CRC")
}

/// Guest I/O that people can see (issue 15 item 6), on a real dev cluster: a VM with two
/// replicated disks; its built-in guest writes a seeded pattern on the second one
/// through virtio-blk; `cairn status` (text and JSON) shows that disk's volume,
/// attachment, copies in sync, where its data is and the guest's own I/O counters,
/// which moved on that disk only; and qemu-img and nbdinfo read the same bytes through
/// the volume's export (`cairn volume export`, read-only while the VM runs).
#[test]
fn the_guest_writes_its_second_disk_status_shows_its_counters_and_the_export_holds_the_bytes() {
    use crate::engine::{Cluster, kvm_usable};
    use std::process::Command;

    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and applying starts VMs");
        return;
    }
    if Command::new("qemu-img").arg("--version").output().is_err() {
        eprintln!("skipped: qemu-img (qemu-utils) is not installed");
        return;
    }
    const OFFSET: u64 = 3 << 20;
    const LENGTH: u64 = 128 << 10;
    const SEED: u64 = 0x5EED_0015;
    let cluster = Cluster::up_with("guest-io-status", &["workloads.kdl"]);
    std::fs::write(
        cluster.path().join("workloads.kdl"),
        "vm \"two\" tenant=\"dev\" site=\"lab\" {\n    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n    disk \"root\" size=\"8MiB\" pool=\"local\"\n    disk \"data\" size=\"16MiB\" pool=\"local\"\n}\n",
    )
    .expect("write workloads.kdl");
    let apply = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{apply:?}");

    let offset = OFFSET.to_string();
    let length = LENGTH.to_string();
    let seed = SEED.to_string();
    let io = |op: &str| {
        let mut args = vec!["two", op, ".", "--disk", "data", "--offset", &offset];
        args.extend_from_slice(&["--length", &length]);
        if op == "write-pattern" {
            args.extend_from_slice(&["--seed", &seed]);
        }
        guest_crc(&cluster, &args)
    };
    let expected = vmm::guest::disk_pattern(OFFSET, LENGTH, SEED);
    let expected_crc = vmm::guest::disk_checksum(&expected);
    assert_eq!(
        io("write-pattern"),
        expected_crc,
        "the guest wrote the pattern"
    );
    assert_eq!(io("checksum"), expected_crc, "and reads it back");

    // Status, JSON: both disks, the second with the guest's count of this I/O.
    let status = cluster.status_json();
    let vm = status["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .find(|v| v["name"] == "two")
        .unwrap_or_else(|| panic!("two in {status}"));
    assert_eq!(vm["state"], "running", "{vm}");
    let disks = vm["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 2, "{vm}");
    let (root, data) = (&disks[0], &disks[1]);
    assert_eq!(root["volume"], "two-root", "{root}");
    assert_eq!(data["volume"], "two-data", "{data}");
    assert_eq!(
        (&data["attached"], &data["device"]),
        (&true.into(), &1.into()),
        "{data}"
    );
    assert_eq!(data["data"], "local", "{data}");
    assert_eq!(
        (&data["copies"], &data["copies_in_sync"]),
        (&2.into(), &2.into()),
        "{data}"
    );
    assert_eq!(data["copies_state"], "in-sync", "{data}");
    assert_eq!(data["guest"]["bytes_written"], LENGTH, "{data}");
    assert_eq!(data["guest"]["bytes_read"], LENGTH, "{data}");
    assert_eq!(
        data["guest"]["requests"],
        2 * LENGTH / 65536,
        "64 KiB requests: {data}"
    );
    assert_eq!(data["guest"]["errors"], 0, "{data}");
    assert_eq!(
        data["bytes_written"], LENGTH,
        "the VMM counted the same: {data}"
    );
    assert_eq!(
        root["guest"]["bytes_written"], 4096,
        "the first disk has only the boot self-test's 4 KiB: {root}"
    );
    // Status, text: the disks section's row of the second disk.
    let text = cluster.cairn(&["status", "."]);
    assert_eq!(text.code, 0, "{text:?}");
    let row = text
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("two") && l.contains("two-data"))
        .unwrap_or_else(|| panic!("a disks row for two-data: {}", text.stdout));
    let words: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &words[..6],
        ["two", "two-data", "vdb", "local", "2/2", "in-sync"],
        "{row}"
    );
    assert!(row.contains("4, 128KiB/128KiB"), "the guest's count: {row}");
    eprintln!("{row}");

    // The volume's export: qemu-img and nbdinfo read the guest's bytes.
    let export = cluster.cairn(&["volume", "export", "two/data", "."]);
    assert_eq!(export.code, 0, "{export:?}");
    let uri = export.stdout.trim().to_owned();
    let out = cluster.path().join("data.raw");
    let convert = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&out)
        .output()
        .expect("qemu-img runs");
    assert!(
        convert.status.success(),
        "qemu-img convert {uri}: {convert:?}"
    );
    let image = std::fs::read(&out).expect("the disk's bytes");
    assert_eq!(image.len(), 16 << 20);
    let range = &image[OFFSET as usize..(OFFSET + LENGTH) as usize];
    assert!(
        range == expected.as_slice(),
        "qemu-img reads the guest's pattern"
    );
    assert_eq!(vmm::guest::disk_checksum(range), expected_crc);
    match Command::new("nbdinfo").args(["--size", &uri]).output() {
        Ok(info) if info.status.success() => assert_eq!(
            String::from_utf8_lossy(&info.stdout).trim(),
            (16u64 << 20).to_string(),
            "nbdinfo sees the volume"
        ),
        Ok(info) => panic!("nbdinfo --size {uri}: {info:?}"),
        Err(_) => eprintln!("nbdinfo (libnbd-bin) is not installed: its check skipped"),
    }
    match Command::new("nbdcopy").args([&uri, "-"]).output() {
        Ok(copy) if copy.status.success() => assert!(
            copy.stdout[OFFSET as usize..(OFFSET + LENGTH) as usize] == expected[..],
            "nbdcopy reads the guest's pattern"
        ),
        Ok(copy) => panic!("nbdcopy {uri}: {copy:?}"),
        Err(_) => eprintln!("nbdcopy (libnbd-bin) is not installed: its check skipped"),
    }
}
