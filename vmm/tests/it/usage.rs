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

/// Runs `cairn-vmm --config FILE` with `config` written to FILE.
fn config_exit_code_of(config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("vm.json");
    std::fs::write(&path, config).expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_cairn-vmm"))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run cairn-vmm");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_size_without_a_known_unit_is_a_usage_error() {
    let (code, stderr) = exit_code_of(&["--memory", "64Gb"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unknown unit `Gb` in `64Gb`"), "{stderr}");
    assert!(stderr.contains("units: B KiB MiB"), "{stderr}");
}

#[test]
fn a_memory_size_the_limits_refuse_is_a_usage_error_naming_the_field() {
    // 64MB is a size (the compiler's grammar) but not a whole number of MiB.
    let (code, stderr) = exit_code_of(&["--memory", "64MB"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("memory_bytes: 64000000 bytes is not a multiple of 1MiB"),
        "{stderr}"
    );
    let (code, stderr) = exit_code_of(&["--memory", "64MiB", "--vcpus", "65"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("vcpus: 65 is more than the maximum of 64"),
        "{stderr}"
    );
}

#[test]
fn a_config_file_is_validated_before_anything_is_built() {
    let valid = vm_config::VmConfig::builtin("cfg", 1, 64 << 20, std::path::Path::new("/tmp/x"));
    let mut json: serde_json::Value = serde_json::to_value(&valid).expect("json");
    json["vcpus"] = 300.into();
    let (code, stderr) = config_exit_code_of(&json.to_string());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "error: vm cfg: invalid VM configuration: vcpus: 300 is more than the maximum of 64"
        ),
        "{stderr}"
    );

    json["vcpus"] = 1.into();
    json["memroy_bytes"] = 1.into();
    let (code, stderr) = config_exit_code_of(&json.to_string());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unknown field `memroy_bytes`"), "{stderr}");

    let (code, stderr) = config_exit_code_of("");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("is not a cairn-vmm VM description"),
        "{stderr}"
    );
}

#[test]
fn a_config_file_excludes_the_vm_flags() {
    let output = Command::new(env!("CARGO_BIN_EXE_cairn-vmm"))
        .args(["--config", "/nonexistent.json", "--memory", "64MiB"])
        .output()
        .expect("run cairn-vmm");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

#[test]
fn an_unknown_builtin_guest_is_a_usage_error() {
    let (code, stderr) = exit_code_of(&["--memory", "64MiB", "--builtin", "doom"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("boot.builtin.name: `doom` is not a built-in guest"),
        "{stderr}"
    );
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
