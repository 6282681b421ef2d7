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
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

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
    /// The namespace's mount lies under a later mount of `/run/netns`, where
    /// no path reaches it, so its file cannot be removed.
    #[error(
        "network namespace `{0}` cannot be removed: it was mounted before {NETNS_RUN_DIR} was a shared mount point, \
         and a later `ip netns add` (or another tool) bind-mounted {NETNS_RUN_DIR} over it. It goes away at reboot; \
         to free it now run `umount --lazy {NETNS_RUN_DIR}` and delete it again \
         (namespaces added after that bind mount lose their names)"
    )]
    Covered(String),
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
/// Creating a namespace that already exists is not an error; a stale file of
/// that name that holds no namespace (its mount died with a reboot or another
/// mount namespace) is replaced.
///
/// The file is bound the way iproute2 binds its own: `/run/netns` is first
/// made a shared mount point of itself ([`share_run_dir`]), so that a later
/// `ip netns add`, which does the same, finds it done and does not bind-mount
/// `/run/netns` over this namespace's mount.
pub fn create_netns(name: &str) -> Result<NetNs, NetnsError> {
    check_name(name)?;
    let ns = NetNs::named(name);
    let path = netns_path(name);
    if path.exists() {
        if is_namespace_file(&path) {
            return Ok(ns);
        }
        std::fs::remove_file(&path).map_err(|source| {
            if source.raw_os_error() == Some(libc::EBUSY) {
                NetnsError::Covered(name.to_owned())
            } else {
                NetnsError::Sys {
                    what: "remove stale namespace file",
                    name: name.to_owned(),
                    source,
                }
            }
        })?;
    }
    let sys = |what: &'static str| {
        let source = std::io::Error::last_os_error();
        NetnsError::Sys {
            what,
            name: name.to_owned(),
            source,
        }
    };
    share_run_dir().map_err(|(what, source)| NetnsError::Sys {
        what,
        name: name.to_owned(),
        source,
    })?;
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

/// A failed step of [`share_run_dir`]: what was attempted, and the error.
type RunDirError = (&'static str, std::io::Error);

/// Makes `/run/netns` a shared mount point of itself, iproute2's convention
/// (`netns_add` in iproute2's `ip/ipnetns.c`): create the directory, then
/// `mount --make-rshared` it; if that fails with EINVAL the directory is not
/// a mount point yet, so bind-mount it onto itself and make that shared.
///
/// Why it matters: `ip netns add` runs the same steps. If a namespace were
/// bound into a plain directory, the first `ip netns add` after it would
/// bind-mount `/run/netns` over that namespace's mount, which no path reaches
/// any more, and deleting the namespace fails with EBUSY (it leaks). Being
/// shared also lets an unmount in one mount namespace reach the others.
///
/// Namespaces already bound into the plain directory (by a tool, or a cairn,
/// that skipped this step) are carried over: each is held open, unmounted,
/// and bound again onto its file in the new mount point, so the bind mount
/// does not hide them either.
///
/// The steps run under an exclusive `flock` of the directory, the lock
/// iproute2 takes for them, so concurrent callers do not stack bind mounts.
fn share_run_dir() -> Result<(), RunDirError> {
    let dir = Path::new(NETNS_RUN_DIR);
    match std::fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(("create /run/netns", e)),
    }
    let lock = File::open(dir).map_err(|e| ("open /run/netns", e))?;
    loop {
        // SAFETY: flock on an fd kept open by `lock` for the call; the lock
        // is released when `lock` is dropped (closed) at the end.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(("lock /run/netns", e));
        }
    }
    let dir_c = c"/run/netns";
    let make_shared = || {
        // SAFETY: a propagation change takes only the target path (a valid
        // nul-terminated string) and flags; source, fstype and data are unused.
        let rc = unsafe {
            libc::mount(
                c"none".as_ptr(),
                dir_c.as_ptr(),
                std::ptr::null(),
                libc::MS_SHARED | libc::MS_REC,
                std::ptr::null(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    match make_shared() {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => return Err(("make /run/netns a shared mount", e)),
    }
    let held = detach_namespaces_in_run_dir()?;
    // SAFETY: source and target are the same valid nul-terminated path; a
    // bind mount with null fstype/data is the documented form.
    let rc = unsafe {
        libc::mount(
            dir_c.as_ptr(),
            dir_c.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    };
    let shared = if rc == 0 {
        make_shared().map_err(|e| ("make /run/netns a shared mount", e))
    } else {
        Err((
            "bind-mount /run/netns onto itself",
            std::io::Error::last_os_error(),
        ))
    };
    // Bound again whatever happened above: on failure they go back into the
    // plain directory, where they were.
    let rebound = rebind_namespaces(held);
    shared.and(rebound)
}

/// Namespace mounts directly in `/run/netns` (the top one of each file, as
/// often as it is mounted), from this thread's mount table.
fn namespace_mounts_in_run_dir() -> Result<Vec<PathBuf>, RunDirError> {
    let table = std::fs::read_to_string("/proc/thread-self/mountinfo")
        .map_err(|e| ("read /proc/thread-self/mountinfo", e))?;
    Ok(table
        .lines()
        .filter_map(parse_mountinfo_line)
        .filter(|(point, fstype)| {
            *fstype == "nsfs" && point.parent() == Some(Path::new(NETNS_RUN_DIR))
        })
        .map(|(point, _)| point)
        .collect())
}

/// The mount point and filesystem type of one `/proc/*/mountinfo` line.
fn parse_mountinfo_line(line: &str) -> Option<(PathBuf, &str)> {
    let (before, after) = line.split_once(" - ")?;
    let point = before.split(' ').nth(4)?;
    let fstype = after.split(' ').next()?;
    Some((PathBuf::from(unescape_mountinfo(point)), fstype))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\134` for `\`).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let digits = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(digits, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens and unmounts every namespace bound in `/run/netns`; the open files
/// keep the namespaces alive until [`rebind_namespaces`].
fn detach_namespaces_in_run_dir() -> Result<Vec<(PathBuf, File)>, RunDirError> {
    let mut held: Vec<(PathBuf, File)> = Vec::new();
    for point in namespace_mounts_in_run_dir()? {
        if !held.iter().any(|(p, _)| *p == point) {
            match File::open(&point) {
                Ok(file) => held.push((point.clone(), file)),
                // Gone meanwhile (an `ip netns del`): nothing to carry over.
                Err(_) => continue,
            }
        }
        let target = CString::new(point.as_os_str().as_encoded_bytes()).expect("path has no nul");
        // SAFETY: target is a valid nul-terminated path; MNT_DETACH is a plain flag.
        let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // Put back what was already taken down before giving up.
            let _ = rebind_namespaces(held);
            return Err(("unmount a namespace to carry it over", e));
        }
    }
    Ok(held)
}

/// Binds each held namespace onto its file again; returns the first failure
/// after trying them all.
fn rebind_namespaces(held: Vec<(PathBuf, File)>) -> Result<(), RunDirError> {
    let mut first = Ok(());
    for (point, file) in held {
        let source =
            CString::new(format!("/proc/thread-self/fd/{}", file.as_raw_fd())).expect("no nul");
        let target = CString::new(point.as_os_str().as_encoded_bytes()).expect("path has no nul");
        // SAFETY: both paths are valid nul-terminated strings and `file`
        // keeps the fd the source names open for the call; a bind mount with
        // null fstype/data is the documented form.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if rc != 0 && first.is_ok() {
            first = Err((
                "bind a carried-over namespace again",
                std::io::Error::last_os_error(),
            ));
        }
    }
    first
}

/// Whether `path` is a bound network namespace rather than a plain file:
/// every namespace file lives on the kernel's one nsfs filesystem, so it has
/// the device of `/proc/self/ns/net`.
fn is_namespace_file(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::metadata(path),
        std::fs::metadata("/proc/self/ns/net"),
    ) {
        (Ok(file), Ok(nsfs)) => file.dev() == nsfs.dev(),
        _ => false,
    }
}

/// Deletes the named namespace (like `ip netns del`): detaches its mount
/// (`MNT_DETACH`, so a process still inside it does not block deletion),
/// then removes the file. Devices inside it are destroyed by the kernel once
/// nothing holds the namespace. Missing is not an error.
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
        // EINVAL: not a mount point (a stale file); ENOENT: deleted meanwhile.
        if !matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
            return Err(NetnsError::Sys {
                what: "unmount namespace",
                name: name.to_owned(),
                source: err,
            });
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        // Still a mount point somewhere, yet not reachable here: a mount of
        // /run/netns lies over it.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            Err(NetnsError::Covered(name.to_owned()))
        }
        Err(source) => Err(NetnsError::Sys {
            what: "remove namespace file",
            name: name.to_owned(),
            source,
        }),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_mount_point_and_filesystem_type() {
        let ns = "612 42 0:4 net:[4026532178] /run/netns/cairn-sw rw shared:1 - nsfs nsfs rw";
        assert_eq!(
            parse_mountinfo_line(ns),
            Some((PathBuf::from("/run/netns/cairn-sw"), "nsfs"))
        );
        // Optional fields vary in number; the type follows the ` - ` marker.
        let dir =
            "42 27 254:0 /run/netns /run/netns rw,relatime shared:1 master:2 - ext4 /dev/vda rw";
        assert_eq!(
            parse_mountinfo_line(dir),
            Some((PathBuf::from("/run/netns"), "ext4"))
        );
        let escaped = r"7 1 0:4 net:[1] /run/netns/a\040b\134c rw - nsfs nsfs rw";
        assert_eq!(
            parse_mountinfo_line(escaped),
            Some((PathBuf::from(r"/run/netns/a b\c"), "nsfs"))
        );
        assert_eq!(parse_mountinfo_line("garbage"), None);
    }
}
