//! [`VmConfig`]: one VM to run, as data (Firecracker's `vmm_config` is the model: the
//! serialized description versus the live VM, every limit checked in one function with
//! one error enum).

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::limits::{self, LimitError};

/// The version of [`VmConfig`]'s format. A reader refuses any other; fields are added
/// with defaults, and a change that old readers would misread bumps it.
pub const FORMAT_VERSION: u32 = 1;

/// The name of the built-in guest, the only [`BootSource::Builtin`].
pub const BUILTIN_GUEST: &str = "cairn-guest";

/// The kernel command line when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Longest unix socket path (`sun_path` holds 108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Longest network device name (`IFNAMSIZ` 16 with the NUL).
const MAX_TAP_NAME: usize = 15;
/// Longest NBD export name (the NBD protocol's limit for a name).
pub const MAX_NBD_EXPORT_NAME: usize = 4096;

/// One VM to run: what `cairn-node` writes and `cairn-vmm --config` reads. Paths and
/// names only, never open files, so it can be stored and sent to another host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The VM's name (events, errors, default MACs).
    pub name: String,
    /// vCPUs ([`limits::VCPUS`]; [`limits::LINUX_VCPUS`] for a kernel).
    pub vcpus: u32,
    /// Guest RAM in bytes ([`limits::MEMORY`]).
    pub memory_bytes: u64,
    /// What to boot.
    pub boot: BootSource,
    /// Disks, each a virtio-blk device, in order ([`limits::DISKS`]).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// NICs, each a virtio-net device on a tap, in order ([`limits::NICS`]).
    #[serde(default)]
    pub nics: Vec<NicConfig>,
    /// Where the control socket is served.
    pub control_socket: PathBuf,
    /// Where the serial console is appended.
    pub console_log: PathBuf,
    /// The built-in guest's main-loop period, in milliseconds (at least 1).
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Pages per second the built-in guest dirties from the start.
    #[serde(default)]
    pub dirty_pages_per_second: u64,
    /// How long a graceful power-off waits for the guest, in milliseconds.
    #[serde(default = "default_power_off_grace_ms")]
    pub power_off_grace_ms: u64,
    /// Which start of the VM this process is: an id the node generates for each spawn
    /// and asks back over the control socket (`identify`) before it adopts a running
    /// VMM after an agent restart. Empty when the VMM was not started by a node.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub incarnation: String,
    /// The fence deadline the VM starts with (`CLOCK_BOOTTIME` ns; 0: not armed): the
    /// end of its node's quorum at spawn, so a VM restarted by HA is fenced from its
    /// first instruction, before its node's next lease names it (the node's quorum
    /// loop then renews it, or disarms it if it is not an HA or FT VM).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fence_deadline_boottime_ns: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

fn default_tick_ms() -> u64 {
    10
}

fn default_power_off_grace_ms() -> u64 {
    2000
}

/// What a VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BootSource {
    /// A guest built into `cairn-vmm`; the only one is [`BUILTIN_GUEST`].
    Builtin {
        /// Its name.
        name: String,
    },
    /// A Linux bzImage with an optional initrd.
    Kernel {
        /// The bzImage (absolute path on the host that runs the VM).
        kernel: PathBuf,
        /// The initrd, if any (absolute path).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        initrd: Option<PathBuf>,
        /// The kernel command line (the VMM appends one `virtio_mmio.device=` per
        /// device).
        cmdline: String,
    },
}

/// A disk served as a virtio-blk device: a file or block device, or a volume of the
/// node's volume engine reached over NBD on a unix socket (`nbd_export` set; `path` is
/// then the socket the node serves the volume on, and every write the guest makes goes
/// through the node's replicated write path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The file or block device, or the NBD server's unix socket (absolute path).
    pub path: PathBuf,
    /// Serve it read-only.
    #[serde(default)]
    pub read_only: bool,
    /// The NBD export name (the volume) when `path` is an NBD server's unix socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_export: Option<String>,
}

/// A NIC: a virtio-net device on an existing tap of the VMM's network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// The tap's name (1 to 15 characters).
    pub tap: String,
    /// The guest's MAC address (unicast).
    pub mac: MacAddress,
    /// The address the built-in guest answers ARP and ping for (first NIC only; a Linux
    /// guest configures its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Addr>,
}

/// A MAC address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// Whether it is a unicast address (the first byte is even).
    pub fn is_unicast(self) -> bool {
        self.0[0] & 1 == 0
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddress({self})")
    }
}

impl std::str::FromStr for MacAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a MAC address like 02:ca:00:00:00:01");
        let mut mac = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(mac))
    }
}

impl Serialize for MacAddress {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddress {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a [`VmConfig`] cannot run. Each names its field (`nics[1].tap`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmConfigError {
    /// Written for another version of the format.
    #[error("format_version: {found} is not the format this cairn-vmm reads ({FORMAT_VERSION})")]
    FormatVersion {
        /// The version found.
        found: u32,
    },
    /// No name.
    #[error("name: must not be empty")]
    EmptyName,
    /// A value outside [`limits`].
    #[error("{field}: {error}; {}", error.limit().rule())]
    Limit {
        /// The field (`vcpus`, `memory_bytes`, `disks`, `nics`).
        field: &'static str,
        /// What is wrong.
        error: LimitError,
    },
    /// A built-in guest that does not exist.
    #[error("boot.builtin.name: `{0}` is not a built-in guest; the only one is `{BUILTIN_GUEST}`")]
    UnknownBuiltin(String),
    /// A path that is empty or relative (a config must mean the same wherever it is
    /// read, whatever the working directory).
    #[error("{field}: `{}` is not an absolute path", path.display())]
    RelativePath {
        /// The field.
        field: String,
        /// The path.
        path: PathBuf,
    },
    /// A control socket path too long for a unix socket.
    #[error("control_socket: `{}` is {} bytes long; a unix socket path has at most {MAX_SOCKET_PATH}", path.display(), path.as_os_str().len())]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
    },
    /// A tap name the kernel would not accept.
    #[error(
        "{field}: {tap:?} is not a network device name (1 to {MAX_TAP_NAME} characters, no '/' or spaces)"
    )]
    TapName {
        /// The field.
        field: String,
        /// The name.
        tap: String,
    },
    /// An NBD export name that is empty or too long.
    #[error(
        "{field}: an NBD export name of {length} bytes; give 1 to {MAX_NBD_EXPORT_NAME} bytes (the volume's name)"
    )]
    NbdExport {
        /// The field.
        field: String,
        /// Its length.
        length: usize,
    },
    /// Two NICs on one tap.
    #[error("{field}: tap `{tap}` is already used by nics[{first}]")]
    DuplicateTap {
        /// The field of the second use.
        field: String,
        /// The tap.
        tap: String,
        /// The index of the first use.
        first: usize,
    },
    /// A multicast MAC.
    #[error("{field}: {mac} is a multicast address; a NIC needs a unicast one (first byte even)")]
    MulticastMac {
        /// The field.
        field: String,
        /// The address.
        mac: MacAddress,
    },
    /// A tick of zero.
    #[error("tick_ms: must be at least 1")]
    ZeroTick,
}

impl VmConfigError {
    /// The field the error is about, as written in the config (`nics[1].tap`).
    pub fn field(&self) -> String {
        match self {
            Self::FormatVersion { .. } => "format_version".into(),
            Self::EmptyName => "name".into(),
            Self::Limit { field, .. } => (*field).into(),
            Self::UnknownBuiltin(_) => "boot.builtin.name".into(),
            Self::SocketPathTooLong { .. } => "control_socket".into(),
            Self::ZeroTick => "tick_ms".into(),
            Self::RelativePath { field, .. }
            | Self::TapName { field, .. }
            | Self::NbdExport { field, .. }
            | Self::DuplicateTap { field, .. }
            | Self::MulticastMac { field, .. } => field.clone(),
        }
    }
}

fn absolute(field: impl Into<String>, path: &Path) -> Result<(), VmConfigError> {
    if path.is_absolute() {
        return Ok(());
    }
    Err(VmConfigError::RelativePath {
        field: field.into(),
        path: path.to_path_buf(),
    })
}

fn within(field: &'static str, limit: &limits::Limit, value: u64) -> Result<(), VmConfigError> {
    limit
        .check(value)
        .map_err(|error| VmConfigError::Limit { field, error })
}

impl VmConfig {
    /// A built-in-guest VM with the defaults (10 ms tick, no dirtying, 2 s grace, no
    /// disks or NICs), its console and control socket in `vm_dir`.
    pub fn builtin(name: &str, vcpus: u32, memory_bytes: u64, vm_dir: &Path) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            name: name.to_string(),
            vcpus,
            memory_bytes,
            boot: BootSource::Builtin {
                name: BUILTIN_GUEST.to_string(),
            },
            disks: Vec::new(),
            nics: Vec::new(),
            control_socket: vm_dir.join("control.sock"),
            console_log: vm_dir.join("console.log"),
            tick_ms: default_tick_ms(),
            dirty_pages_per_second: 0,
            power_off_grace_ms: default_power_off_grace_ms(),
            incarnation: String::new(),
            fence_deadline_boottime_ns: 0,
        }
    }

    /// Checks everything that can be checked without touching the host: the format
    /// version, every value against [`limits`], names and paths. The first problem
    /// found is returned, naming its field.
    pub fn validate(&self) -> Result<(), VmConfigError> {
        if self.format_version != FORMAT_VERSION {
            return Err(VmConfigError::FormatVersion {
                found: self.format_version,
            });
        }
        if self.name.is_empty() {
            return Err(VmConfigError::EmptyName);
        }
        within("vcpus", &limits::VCPUS, u64::from(self.vcpus))?;
        within("memory_bytes", &limits::MEMORY, self.memory_bytes)?;
        match &self.boot {
            BootSource::Builtin { name } => {
                if name != BUILTIN_GUEST {
                    return Err(VmConfigError::UnknownBuiltin(name.clone()));
                }
            }
            BootSource::Kernel { kernel, initrd, .. } => {
                within("vcpus", &limits::LINUX_VCPUS, u64::from(self.vcpus))?;
                absolute("boot.kernel.kernel", kernel)?;
                if let Some(initrd) = initrd {
                    absolute("boot.kernel.initrd", initrd)?;
                }
            }
        }
        within("disks", &limits::DISKS, self.disks.len() as u64)?;
        for (index, disk) in self.disks.iter().enumerate() {
            absolute(format!("disks[{index}].path"), &disk.path)?;
            if let Some(export) = &disk.nbd_export
                && (export.is_empty() || export.len() > MAX_NBD_EXPORT_NAME)
            {
                return Err(VmConfigError::NbdExport {
                    field: format!("disks[{index}].nbd_export"),
                    length: export.len(),
                });
            }
        }
        within("nics", &limits::NICS, self.nics.len() as u64)?;
        for (index, nic) in self.nics.iter().enumerate() {
            let field = format!("nics[{index}].tap");
            if nic.tap.is_empty()
                || nic.tap.len() > MAX_TAP_NAME
                || nic.tap.contains(['/', ' ', '\0'])
            {
                return Err(VmConfigError::TapName {
                    field,
                    tap: nic.tap.clone(),
                });
            }
            if let Some(first) = self.nics[..index].iter().position(|n| n.tap == nic.tap) {
                return Err(VmConfigError::DuplicateTap {
                    field,
                    tap: nic.tap.clone(),
                    first,
                });
            }
            if !nic.mac.is_unicast() {
                return Err(VmConfigError::MulticastMac {
                    field: format!("nics[{index}].mac"),
                    mac: nic.mac,
                });
            }
        }
        absolute("control_socket", &self.control_socket)?;
        if self.control_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmConfigError::SocketPathTooLong {
                path: self.control_socket.clone(),
            });
        }
        absolute("console_log", &self.console_log)?;
        if self.tick_ms == 0 {
            return Err(VmConfigError::ZeroTick);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> VmConfig {
        VmConfig::builtin("app", 2, 64 << 20, Path::new("/run/cairn/vms/app"))
    }

    fn refused(edit: impl FnOnce(&mut VmConfig)) -> VmConfigError {
        let mut config = vm();
        edit(&mut config);
        config.validate().expect_err("refused")
    }

    #[test]
    fn a_plain_builtin_vm_is_valid_and_round_trips_through_json() {
        let mut config = vm();
        config.nics.push(NicConfig {
            tap: "vt-app-0".into(),
            mac: "02:ca:01:02:03:04".parse().unwrap(),
            ipv4: Some(Ipv4Addr::new(10, 0, 0, 2)),
        });
        config.disks.push(DiskConfig {
            path: "/var/lib/disk.img".into(),
            read_only: true,
            nbd_export: None,
        });
        config.validate().expect("valid");
        let text = serde_json::to_string(&config).unwrap();
        assert!(
            text.contains(r#""boot":{"builtin":{"name":"cairn-guest"}}"#),
            "{text}"
        );
        assert!(text.contains(r#""mac":"02:ca:01:02:03:04""#), "{text}");
        assert!(text.contains(r#""ipv4":"10.0.0.2""#), "{text}");
        assert_eq!(serde_json::from_str::<VmConfig>(&text).unwrap(), config);
    }

    #[test]
    fn defaults_fill_the_tuning_fields_and_unknown_fields_are_refused() {
        let text = r#"{"format_version":1,"name":"a","vcpus":1,"memory_bytes":16777216,
            "boot":{"kernel":{"kernel":"/k","cmdline":"console=ttyS0"}},
            "control_socket":"/r/a/control.sock","console_log":"/r/a/console.log"}"#;
        let config: VmConfig = serde_json::from_str(text).unwrap();
        assert_eq!((config.tick_ms, config.power_off_grace_ms), (10, 2000));
        assert!(config.disks.is_empty() && config.nics.is_empty());
        config.validate().expect("valid");
        let typo = text.replace("\"vcpus\"", "\"vcpu\"");
        assert!(serde_json::from_str::<VmConfig>(&typo).is_err());
    }

    #[test]
    fn each_refusal_names_its_field() {
        let cases: Vec<(VmConfigError, &str, &str)> = vec![
            (
                refused(|c| c.format_version = 2),
                "format_version",
                "2 is not",
            ),
            (refused(|c| c.name.clear()), "name", "empty"),
            (
                refused(|c| c.vcpus = 0),
                "vcpus",
                "less than the minimum of 1",
            ),
            (
                refused(|c| c.vcpus = 300),
                "vcpus",
                "300 is more than the maximum of 64",
            ),
            (
                refused(|c| c.memory_bytes = 100_000_000),
                "memory_bytes",
                "100000000 bytes is not a multiple of 1MiB",
            ),
            (
                refused(|c| c.memory_bytes = 4 << 20),
                "memory_bytes",
                "4MiB is less than the minimum of 16MiB",
            ),
            (
                refused(|c| {
                    c.vcpus = 48;
                    c.boot = BootSource::Kernel {
                        kernel: "/boot/vmlinuz".into(),
                        initrd: None,
                        cmdline: DEFAULT_CMDLINE.into(),
                    };
                }),
                "vcpus",
                "48 is more than the maximum of 32",
            ),
            (
                refused(|c| {
                    c.boot = BootSource::Kernel {
                        kernel: "vmlinuz".into(),
                        initrd: None,
                        cmdline: String::new(),
                    };
                }),
                "boot.kernel.kernel",
                "not an absolute path",
            ),
            (
                refused(|c| {
                    c.boot = BootSource::Builtin {
                        name: "doom".into(),
                    }
                }),
                "boot.builtin.name",
                "the only one is `cairn-guest`",
            ),
            (
                refused(|c| {
                    for _ in 0..9 {
                        c.disks.push(DiskConfig {
                            path: "/d".into(),
                            read_only: false,
                            nbd_export: None,
                        });
                    }
                }),
                "disks",
                "9 is more than the maximum of 8",
            ),
            (
                refused(|c| {
                    c.disks.push(DiskConfig {
                        path: "disk.img".into(),
                        read_only: false,
                        nbd_export: None,
                    });
                }),
                "disks[0].path",
                "not an absolute path",
            ),
            (
                refused(|c| {
                    c.disks.push(DiskConfig {
                        path: "/run/disk.sock".into(),
                        read_only: false,
                        nbd_export: Some(String::new()),
                    });
                }),
                "disks[0].nbd_export",
                "an NBD export name of 0 bytes",
            ),
            (
                refused(|c| {
                    c.nics.push(NicConfig {
                        tap: "a-tap-name-too-long".into(),
                        mac: MacAddress([2, 0, 0, 0, 0, 1]),
                        ipv4: None,
                    });
                }),
                "nics[0].tap",
                "not a network device name",
            ),
            (
                refused(|c| {
                    for index in 0..2 {
                        c.nics.push(NicConfig {
                            tap: "tap0".into(),
                            mac: MacAddress([2, 0, 0, 0, 0, index]),
                            ipv4: None,
                        });
                    }
                }),
                "nics[1].tap",
                "already used by nics[0]",
            ),
            (
                refused(|c| {
                    c.nics.push(NicConfig {
                        tap: "tap0".into(),
                        mac: MacAddress([1, 0, 0, 0, 0, 1]),
                        ipv4: None,
                    });
                }),
                "nics[0].mac",
                "multicast",
            ),
            (
                refused(|c| c.control_socket = PathBuf::from(format!("/{}", "x".repeat(120)))),
                "control_socket",
                "at most 107",
            ),
            (refused(|c| c.tick_ms = 0), "tick_ms", "at least 1"),
        ];
        for (error, field, words) in cases {
            assert_eq!(error.field(), field, "{error}");
            let text = error.to_string();
            assert!(text.starts_with(&format!("{field}: ")), "{text}");
            assert!(text.contains(words), "{text} lacks {words:?}");
        }
    }

    #[test]
    fn a_limit_refusal_says_the_rule_and_why() {
        let text = refused(|c| c.memory_bytes = 100_000_000).to_string();
        assert_eq!(
            text,
            format!(
                "memory_bytes: 100000000 bytes is not a multiple of 1MiB; {}",
                limits::MEMORY.rule()
            )
        );
    }

    #[test]
    fn macs_parse_and_print_one_way() {
        let mac: MacAddress = "02:CA:00:0a:ff:01".parse().unwrap();
        assert_eq!(mac.to_string(), "02:ca:00:0a:ff:01");
        for bad in [
            "02:ca:00:0a:ff",
            "02:ca:00:0a:ff:01:02",
            "2:ca:00:0a:ff:01",
            "zz:ca:00:0a:ff:01",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<MacAddress>(r#""nope""#).is_err());
    }
}
