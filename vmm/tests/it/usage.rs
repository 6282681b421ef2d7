//! Usage errors end with exit status 2 before any VM exists (no KVM needed).

use std::process::Command;

fn exit_code_of(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_cairn-vmm"))
        .arg("--vm-dir")
        .arg(dir.path())
        .args(args)
        .output()
        .expect("run cairn-vmm");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_size_without_a_known_unit_is_a_usage_error() {
    let (code, stderr) = exit_code_of(&["--memory", "64MB"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unknown size unit"), "{stderr}");
}

#[test]
fn an_unknown_builtin_guest_is_a_usage_error() {
    let (code, stderr) = exit_code_of(&["--memory", "64MiB", "--builtin", "doom"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unknown built-in guest `doom`"), "{stderr}");
}

#[test]
fn a_missing_disk_is_a_usage_error() {
    let (code, stderr) = exit_code_of(&["--memory", "64MiB", "--disk", "/nonexistent/disk.img"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot open the disk"), "{stderr}");
}

#[test]
fn a_missing_kernel_is_a_usage_error() {
    let (code, stderr) = exit_code_of(&["--memory", "64MiB", "--kernel", "/nonexistent/bzImage"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/bzImage"), "{stderr}");
}

#[test]
fn host_info_reports_the_kind_of_kvm() {
    let output = Command::new(env!("CARGO_BIN_EXE_cairn-vmm"))
        .arg("--host-info")
        .output()
        .expect("run");
    assert!(output.status.success());
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let kind = info["kvm"].as_str().expect("kvm kind");
    assert!(["missing", "pvm", "hardware"].contains(&kind), "{info}");
    assert_eq!(info["linux_bootable"].as_bool(), Some(kind == "hardware"));
}
