//! Named namespaces live beside iproute2's in `/run/netns` and must keep
//! working whatever `ip netns` does there after cairn made them.

use std::path::Path;
use std::process::Command;

use network::netns::{NETNS_RUN_DIR, create_netns, delete_netns};

use crate::common::require_netns;

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip").args(args).output().expect("run ip")
}

fn ip_netns_names() -> Vec<String> {
    let out = ip(&["netns", "list"]);
    assert!(out.status.success(), "ip netns list: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Runs `f` on a thread with a private mount namespace of its own in which
/// `/run/netns` is a plain directory again, the state of a machine where
/// nobody has made it a mount point yet (the host's may well be one already,
/// which would hide the bugs these tests are about). Mounts made there never
/// reach the host's table and vanish with the thread. The directory itself
/// is the host's, so the files named in `names` are removed afterwards,
/// whatever `f` did.
fn in_fresh_mount_namespace<T: Send>(names: &[&str], f: impl FnOnce() -> T + Send) -> T {
    let outcome = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare(CLONE_NEWNS) gives only this thread (and what
            // it spawns) a copy of the mount table; making it private keeps
            // every mount below from propagating to the host's.
            unsafe {
                assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare mount ns");
                let rc = libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                );
                assert_eq!(rc, 0, "make / private");
            }
            std::fs::create_dir_all(NETNS_RUN_DIR).expect("mkdir /run/netns");
            while run_dir_is_mount_point() {
                // SAFETY: a valid path and a plain flag, in the private table.
                let rc = unsafe { libc::umount2(c"/run/netns".as_ptr(), libc::MNT_DETACH) };
                assert_eq!(rc, 0, "umount /run/netns");
            }
            f()
        })
        .join()
    });
    // The mount namespace is gone with its thread, so what is left of ours
    // in the directory are plain files.
    for n in names {
        let _ = std::fs::remove_file(Path::new(NETNS_RUN_DIR).join(n));
    }
    outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn run_dir_is_mount_point() -> bool {
    std::fs::read_to_string("/proc/thread-self/mountinfo")
        .expect("mountinfo")
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(NETNS_RUN_DIR))
}

/// Regression: cairn bound its namespace files into a plain `/run/netns`
/// directory; the first `ip netns add` after that bind-mounted `/run/netns`
/// onto itself over them, and deleting cairn's namespace (`cairn dev down`,
/// `ip netns del`) failed with EBUSY, so the namespace leaked.
#[test]
fn delete_after_ip_netns_add_removes_the_namespace() {
    require_netns!();
    let pid = std::process::id() % 100_000;
    let ours = format!("cnn{pid}-ours");
    let theirs = format!("cairn-test-{pid}");
    in_fresh_mount_namespace(&[&ours, &theirs], || {
        create_netns(&ours).expect("create cairn namespace");
        let added = ip(&["netns", "add", &theirs]);
        assert!(added.status.success(), "ip netns add {theirs}: {added:?}");
        assert!(ip_netns_names().contains(&ours));

        delete_netns(&ours).expect("delete cairn namespace after `ip netns add`");
        let listed = ip_netns_names();
        assert!(
            !listed.contains(&ours),
            "`ip netns list` still shows {ours}: {listed:?}"
        );
        assert!(
            !Path::new(NETNS_RUN_DIR).join(&ours).exists(),
            "{NETNS_RUN_DIR}/{ours} is still there"
        );
        assert!(
            listed.contains(&theirs),
            "`ip netns add`'s namespace went missing: {listed:?}"
        );
        let del = ip(&["netns", "del", &theirs]);
        assert!(del.status.success(), "ip netns del {theirs}: {del:?}");
        assert!(!ip_netns_names().contains(&theirs));
    });
}

/// Binds a new namespace at `path` the way tools that skip iproute2's
/// shared-mount step do (and cairn did): straight into the directory.
fn bind_plain_namespace(path: &Path) {
    std::fs::File::create(path).expect("create namespace file");
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare changes only this helper thread, which exits
            // after the bind; both mount paths are nul-terminated strings.
            unsafe {
                assert_eq!(libc::unshare(libc::CLONE_NEWNET), 0, "unshare");
                let rc = libc::mount(
                    c"/proc/thread-self/ns/net".as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                );
                assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            }
        })
        .join()
        .expect("bind thread");
    });
}

/// A namespace bound into `/run/netns` before anyone made it a shared mount
/// point (an older cairn, another tool) must survive cairn making it one:
/// the bind mount of `/run/netns` onto itself would otherwise hide it the
/// way a later `ip netns add` did.
#[test]
fn namespaces_bound_before_run_netns_was_shared_are_carried_over() {
    require_netns!();
    let pid = std::process::id() % 100_000;
    let old = format!("cnn{pid}-old");
    let new = format!("cnn{pid}-new");
    let theirs = format!("cairn-test-{pid}-b");
    in_fresh_mount_namespace(&[&old, &new, &theirs], || {
        bind_plain_namespace(&Path::new(NETNS_RUN_DIR).join(&old));
        create_netns(&new).expect("create cairn namespace");
        assert!(
            run_dir_is_mount_point(),
            "{NETNS_RUN_DIR} is not a mount point after create"
        );
        let added = ip(&["netns", "add", &theirs]);
        assert!(added.status.success(), "ip netns add: {added:?}");
        let listed = ip_netns_names();
        for n in [&old, &new, &theirs] {
            assert!(listed.contains(n), "{n} missing from {listed:?}");
        }
        delete_netns(&old).expect("delete the namespace bound before /run/netns was shared");
        delete_netns(&new).expect("delete cairn's namespace");
        let del = ip(&["netns", "del", &theirs]);
        assert!(del.status.success(), "ip netns del: {del:?}");
        let listed = ip_netns_names();
        for n in [&old, &new, &theirs] {
            assert!(!listed.contains(n), "{n} still listed: {listed:?}");
        }
    });
}
