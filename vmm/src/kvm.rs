//! Opening `/dev/kvm`, checking what this VMM needs, and telling hardware KVM from PVM.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// The only KVM API version there has ever been (`KVM_GET_API_VERSION`).
pub const KVM_API_VERSION: i32 = 12;

/// Capabilities every VM of this VMM needs, with the reason shown when one is missing.
pub const REQUIRED_CAPABILITIES: &[(Cap, &str)] = &[
    (
        Cap::UserMemory,
        "KVM_CAP_USER_MEMORY (guest memory from the VMM's own mapping)",
    ),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR (x86 TSS region)"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID (KVM_SET_CPUID2)"),
    (
        Cap::ImmediateExit,
        "KVM_CAP_IMMEDIATE_EXIT (kicking vCPUs out of KVM_RUN)",
    ),
    (
        Cap::SyncMmu,
        "KVM_CAP_SYNC_MMU (KSM and madvise on guest memory)",
    ),
];

/// Errors of opening and checking `/dev/kvm`.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and is this user allowed to use it?)")]
    Open(#[source] kvm_ioctls::Error),
    /// The kernel speaks another KVM API version.
    #[error("/dev/kvm reports API version {found}, this VMM needs {KVM_API_VERSION}")]
    ApiVersion {
        /// The version the kernel reported.
        found: i32,
    },
    /// A capability this VMM relies on is missing.
    #[error("/dev/kvm lacks {0}")]
    MissingCapability(&'static str),
}

/// Opens `/dev/kvm` and checks the API version and [`REQUIRED_CAPABILITIES`].
pub fn open_checked() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(KvmError::Open)?;
    check(&kvm)?;
    Ok(kvm)
}

/// Checks an open `/dev/kvm` handle for the API version and [`REQUIRED_CAPABILITIES`].
pub fn check(kvm: &Kvm) -> Result<(), KvmError> {
    let found = kvm.get_api_version();
    if found != KVM_API_VERSION {
        return Err(KvmError::ApiVersion { found });
    }
    for (capability, description) in REQUIRED_CAPABILITIES {
        if !kvm.check_extension(*capability) {
            return Err(KvmError::MissingCapability(description));
        }
    }
    Ok(())
}

/// What kind of KVM this host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKvm {
    /// No usable `/dev/kvm`.
    Missing,
    /// PVM (`kvm_pvm`): pagetable-based virtualization without VT-x/SVM. Small custom
    /// guests run; stock Linux kernels cannot boot (cmpxchg16b, xrstor, int3 stop the
    /// emulator).
    Pvm,
    /// Hardware-assisted KVM (VT-x or SVM).
    Hardware,
}

impl HostKvm {
    /// Detects the host's KVM: `/dev/kvm` present, then `kvm_pvm` loaded or not.
    pub fn detect() -> Self {
        if !Path::new("/dev/kvm").exists() || Kvm::new().is_err() {
            return Self::Missing;
        }
        if Path::new("/sys/module/kvm_pvm").exists() {
            return Self::Pvm;
        }
        Self::Hardware
    }

    /// Why a Linux guest cannot boot here, or `None` when it can.
    pub fn linux_unbootable_reason(self) -> Option<&'static str> {
        match self {
            Self::Missing => Some("no usable /dev/kvm on this host"),
            Self::Pvm => Some(
                "/dev/kvm is PVM (kvm_pvm), not hardware VT-x/SVM: stock Linux kernels stop in \
                 the instruction emulator (lock cmpxchg16b, xrstor, the int3 self-test)",
            ),
            Self::Hardware => None,
        }
    }
}
