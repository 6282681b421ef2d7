//! End-to-end Linux boot: needs hardware KVM and a kernel. On PVM (these build machines)
//! and without /dev/kvm it skips and prints why; the boot path itself is unit-tested
//! against the boot protocol in `vmm::linux`.

use std::path::PathBuf;
use std::time::Duration;

use vmm::kvm::HostKvm;

use crate::support::{VmProcess, wait_until};

/// A kernel to boot: `CAIRN_TEST_KERNEL`, else the host's newest `/boot/vmlinuz-*`.
fn test_kernel() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CAIRN_TEST_KERNEL") {
        return Some(PathBuf::from(path));
    }
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("vmlinuz"))
        })
        .collect();
    kernels.sort();
    kernels.pop()
}

#[test]
fn linux_boots_to_its_banner_on_the_serial_console() {
    let host = HostKvm::detect();
    if let Some(reason) = host.linux_unbootable_reason() {
        eprintln!("skipping linux_boots_to_its_banner_on_the_serial_console: {reason}");
        return;
    }
    let Some(kernel) = test_kernel() else {
        eprintln!(
            "skipping linux_boots_to_its_banner_on_the_serial_console: no kernel (set CAIRN_TEST_KERNEL or install one in /boot)"
        );
        return;
    };
    let kernel = kernel.to_str().expect("utf-8 path").to_string();
    let mut args = vec![
        "--memory",
        "256MiB",
        "--kernel",
        &kernel,
        "--cmdline",
        "console=ttyS0 reboot=k panic=1",
    ];
    let initrd = std::env::var("CAIRN_TEST_INITRD").ok();
    if let Some(initrd) = &initrd {
        args.extend(["--initrd", initrd]);
    }
    let mut vm = VmProcess::spawn(&args);
    let booted = wait_until(Duration::from_secs(60), || {
        vm.console().contains("Linux version")
    });
    assert!(
        booted,
        "no kernel banner on the console: {:?}",
        vm.console()
    );
    let status = vm.status();
    assert_eq!(status.boot, "linux");
}
