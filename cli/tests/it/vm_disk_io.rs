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
