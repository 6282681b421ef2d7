//! Network namespace handles: create, delete, and run code inside one.
//!
//! A [`NetNs`] names either the namespace of the calling process or a named
//! namespace bound at `/run/netns/<name>` (the same place `ip netns` uses, so
//! `ip -n`, `tc -n` and `ip netns exec` see what this module creates).
//! Entering a namespace is done on a short-lived helper thread: `setns(2)`
//! with `CLONE_NEWNET` changes only the calling thread, and sockets keep the
//! namespace they were created in, so a netlink socket opened there can be
//! used from any thread afterwards.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// Where named network namespaces are bound (shared with iproute2).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Errors of namespace handling.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error("network namespace `{name}` is not available at {NETNS_RUN_DIR}/{name}")]
    Missing {
        /// Namespace name.
        name: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{what} for network namespace `{name}` failed")]
    Sys {
        /// What was attempted.
        what: &'static str,
        /// Namespace name.
        name: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The helper thread panicked.
    #[error("helper thread for network namespace `{0}` panicked")]
    ThreadPanicked(String),
    /// The name is not usable as a namespace name.
    #[error("invalid network namespace name `{0}`: use 1-64 characters of [A-Za-z0-9._-]")]
    InvalidName(String),
}

/// A handle on a network namespace, plus the node label used in messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNs {
    name: Option<String>,
    node: String,
}

impl NetNs {
    /// The namespace of the calling process (production: the host's).
    pub fn current(node: impl Into<String>) -> Self {
        Self {
            name: None,
            node: node.into(),
        }
    }

    /// A named namespace at `/run/netns/<name>`; the node label is the name.
    pub fn named(name: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            node: name.clone(),
            name: Some(name),
        }
    }

    /// A named namespace with an explicit node label for messages.
    pub fn named_for_node(name: impl Into<String>, node: impl Into<String>) -> Self {
        Self {
            name: Some(name.into()),
            node: node.into(),
        }
    }

    /// The namespace name, or `None` for the caller's namespace.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The node this namespace belongs to (used in error messages and reports).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Human-readable description: `netns x` or `current netns`.
    pub fn describe(&self) -> String {
        match &self.name {
            Some(n) => format!("netns {n}"),
            None => "current netns".to_owned(),
        }
    }

    /// Arguments that make `ip`/`tc` act in this namespace (`-n NAME`).
    pub(crate) fn iproute_args(&self) -> Vec<String> {
        match &self.name {
            Some(n) => vec!["-n".to_owned(), n.clone()],
            None => Vec::new(),
        }
    }

    /// Runs `f` on a helper thread that has entered this namespace.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let Some(name) = self.name.clone() else {
            return Ok(f());
        };
        let file = File::open(netns_path(&name)).map_err(|source| NetnsError::Missing {
            name: name.clone(),
            source,
        })?;
        std::thread::scope(|scope| {
            let handle = scope.spawn(move || {
                // SAFETY: setns takes a valid open namespace fd (kept alive by
                // `file` for the call) and only changes this helper thread,
                // which exits when the closure returns.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(NetnsError::Sys {
                        what: "setns",
                        name: name.clone(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                Ok(f())
            });
            handle
                .join()
                .map_err(|_| NetnsError::ThreadPanicked(self.node.clone()))?
        })
    }

    /// Whether this namespace exists (always true for the current one).
    pub fn exists(&self) -> bool {
        match &self.name {
            Some(n) => netns_path(n).exists(),
            None => true,
        }
    }
}

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_RUN_DIR).join(name)
}

fn check_name(name: &str) -> Result<(), NetnsError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(NetnsError::InvalidName(name.to_owned()))
    }
}

/// Creates the named namespace (like `ip netns add`) and brings `lo` up.
/// Creating a namespace that already exists is not an error.
pub fn create_netns(name: &str) -> Result<NetNs, NetnsError> {
    check_name(name)?;
    let ns = NetNs::named(name);
    if ns.exists() {
        return Ok(ns);
    }
    let sys = |what: &'static str| {
        let source = std::io::Error::last_os_error();
        NetnsError::Sys {
            what,
            name: name.to_owned(),
            source,
        }
    };
    std::fs::create_dir_all(NETNS_RUN_DIR).map_err(|source| NetnsError::Sys {
        what: "create /run/netns",
        name: name.to_owned(),
        source,
    })?;
    let path = netns_path(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|source| NetnsError::Sys {
            what: "create namespace file",
            name: name.to_owned(),
            source,
        })?;
    let target = CString::new(path.as_os_str().as_encoded_bytes()).expect("path has no nul");
    let result = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare only affects this helper thread, which exits
                // right after binding its new namespace to the file.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(sys("unshare"));
                }
                let source = c"/proc/thread-self/ns/net";
                // SAFETY: both paths are valid nul-terminated strings; a bind
                // mount with null fstype/data is the documented form.
                let rc = unsafe {
                    libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    )
                };
                if rc != 0 {
                    return Err(sys("bind-mount namespace"));
                }
                Ok(())
            })
            .join()
            .map_err(|_| NetnsError::ThreadPanicked(name.to_owned()))?
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    crate::nl::Rtnl::open(&ns)
        .and_then(|mut rtnl| rtnl.set_link_up_by_name("lo", true))
        .map_err(|e| NetnsError::Sys {
            what: "bring up loopback",
            name: name.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(ns)
}

/// Deletes the named namespace (like `ip netns del`); devices inside it are
/// destroyed by the kernel once nothing holds it. Missing is not an error.
pub fn delete_netns(name: &str) -> Result<(), NetnsError> {
    check_name(name)?;
    let path = netns_path(name);
    if !path.exists() {
        return Ok(());
    }
    let target = CString::new(path.as_os_str().as_encoded_bytes()).expect("path has no nul");
    // SAFETY: target is a valid nul-terminated path; MNT_DETACH is a plain flag.
    let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(NetnsError::Sys {
                what: "unmount namespace",
                name: name.to_owned(),
                source: err,
            });
        }
    }
    std::fs::remove_file(&path).map_err(|source| NetnsError::Sys {
        what: "remove namespace file",
        name: name.to_owned(),
        source,
    })
}

/// Lists named namespaces whose name starts with `prefix`.
pub fn list_netns(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_RUN_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Whether this process can create network namespaces (root with
/// `CAP_SYS_ADMIN`, and a kernel with `CONFIG_NET_NS`). Returns the reason
/// when it cannot.
pub fn netns_capability() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".to_owned());
    }
    if !std::path::Path::new("/proc/self/ns/net").exists() {
        return Err("kernel has no network namespaces (/proc/self/ns/net missing)".to_owned());
    }
    let probe = std::thread::spawn(|| {
        // SAFETY: unshare affects only this probe thread, which then exits.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    })
    .join();
    match probe {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("cannot create a network namespace: {e}")),
        Err(_) => Err("namespace probe thread panicked".to_owned()),
    }
}
