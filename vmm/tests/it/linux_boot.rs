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

/// Extracts the hex number after `key` in the probe's console output.
fn probe_value(console: &str, key: &str) -> u64 {
    let start = console
        .find(key)
        .unwrap_or_else(|| panic!("`{key}` in the probe output: {console:?}"))
        + key.len();
    let digits = console[start..].strip_prefix("0x").expect("0x prefix");
    u64::from_str_radix(&digits[..16], 16).expect("16 hex digits")
}

#[test]
fn the_boot_protocol_probe_finds_what_linux_would_at_entry() {
    if !crate::support::kvm_available("the_boot_protocol_probe_finds_what_linux_would_at_entry") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let kernel = dir.path().join("probe.bzImage");
    std::fs::write(&kernel, vmm::guest::LINUX_PROBE).expect("write probe");
    let initrd_bytes: Vec<u8> = (0..50_000u32)
        .map(|index| (index * 31 % 251) as u8)
        .collect();
    let initrd = dir.path().join("initrd.img");
    std::fs::write(&initrd, &initrd_bytes).expect("write initrd");
    let disk = crate::support::disk_image(dir.path(), 1 << 20);
    let second_disk = dir.path().join("data.img");
    std::fs::copy(&disk, &second_disk).expect("second disk");
    let second_disk = second_disk.to_str().expect("utf-8").to_string();
    let (kernel, initrd, disk) = (
        kernel.to_str().expect("utf-8").to_string(),
        initrd.to_str().expect("utf-8").to_string(),
        disk.to_str().expect("utf-8").to_string(),
    );
    let memory: u64 = 128 << 20;
    let mut vm = VmProcess::spawn_in(
        dir,
        &[
            "--memory",
            "128MiB",
            "--vcpus",
            "2",
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--disk",
            &disk,
            "--disk",
            &second_disk,
            "--cmdline",
            "console=ttyS0 cairn.probe=1",
        ],
    );
    let exit = vm.wait_exit(Duration::from_secs(10));
    let console = vm.console();
    assert_eq!(exit.code(), Some(0), "the probe powers off: {console:?}");
    assert!(
        console.contains("cairn-linux-probe: entered"),
        "{console:?}"
    );
    let expected_cmdline = format!(
        "cmdline=console=ttyS0 cairn.probe=1 virtio_mmio.device=4K@{:#x}:{} virtio_mmio.device=4K@{:#x}:{}\r\n",
        vmm::vm::disk_mmio_base(0),
        vmm::vm::VIRTIO_BLK_IRQS[0],
        vmm::vm::disk_mmio_base(1),
        vmm::vm::VIRTIO_BLK_IRQS[1],
    );
    assert!(console.contains(&expected_cmdline), "{console:?}");
    assert_eq!(probe_value(&console, "e820-entries="), 2);
    assert_eq!(
        probe_value(&console, "ram="),
        vmm::linux::EBDA_START + memory - vmm::linux::KERNEL_LOAD_ADDR
    );
    let initrd_address = probe_value(&console, "initrd=");
    assert_eq!(
        initrd_address,
        (memory - initrd_bytes.len() as u64) & !0xfff
    );
    assert_eq!(probe_value(&console, "size="), initrd_bytes.len() as u64);
    let sum: u64 = initrd_bytes.iter().map(|byte| u64::from(*byte)).sum();
    assert_eq!(
        probe_value(&console, "sum="),
        sum,
        "the guest reads the initrd's bytes"
    );
    assert_eq!(probe_value(&console, "loader="), 0xff);
    assert_eq!(
        probe_value(&console, "cs="),
        u64::from(vmm::arch::BOOT_CS),
        "entered with __BOOT_CS"
    );
    assert_eq!(
        probe_value(&console, "mp-cpus="),
        2,
        "the MP table lists both vCPUs"
    );
    assert_eq!(
        probe_value(&console, "mp-sum="),
        0,
        "the MP configuration table checksums to 0"
    );
}
