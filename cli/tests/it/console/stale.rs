//! The console never waits for the nodes once it has a status (issue 23): a
//! stale status is served at once, with its age, and renewed behind the page
//! (stale-while-revalidate); only a controller that never observed waits, once.
//!
//! Real processes: `cairn dev up --simulate --gitops` (one simulator serving every
//! node over real signed gRPC, the controller in a process of its own), and the
//! simulator's `slow NODE MS` fault, which makes every call to a node wait, so an
//! observation of the cluster takes seconds.

use std::time::{Duration, Instant};

use super::browser::http;
use crate::controller::skip_without_tools;
use crate::simulate::{fault, free_ports, up_with_controller};

/// The nodes' address and the controller's (helper B's loopback range).
const NODES_IP: &str = "127.0.0.32";
const CONTROLLER_IP: &str = "127.0.0.31";
const NODES: usize = 3;
/// Each call to a slowed node waits this long; an observation makes two per node.
const SLOW_MS: u64 = 2_500;
/// What a page may take (issue 23's budget for any cluster is 1 s).
const PAGE_BUDGET: Duration = Duration::from_secs(1);

fn spec(base: u16) -> (String, String) {
    let nodes: String = (0..NODES)
        .map(|i| {
            format!(
                "        node \"n{i}\" class=\"sim\" address=\"{NODES_IP}:{}\"\n",
                usize::from(base) + i
            )
        })
        .collect();
    let cluster = format!(
        "node-class \"sim\" {{\n    cpu 32\n    memory \"64GiB\"\n    host-reserve cpu=1 memory=\"1GiB\"\n    disk \"disk0\" size=\"100GiB\" class=\"ssd\"\n    nic \"eth0\" speed=\"10Gbps\"\n}}\n\nimage \"tiny\" builtin=\"cairn-guest\"\n\nsite \"s0\" {{\n    rack \"r0\" {{\n{nodes}    }}\n}}\n\ntenant \"sim\" {{\n    quota vcpus=64 memory=\"8GiB\" storage=\"10GiB\" vms=64\n    member \"sim@example.com\" role=\"admin\"\n}}\n"
    );
    let workloads = "vm-group \"g\" tenant=\"sim\" site=\"s0\" replicas=3 {\n    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n}\n".to_owned();
    (cluster, workloads)
}

/// One GET with the controller's token: status, body, time to the last byte.
fn get(address: &str, token: &str, path: &str) -> (u16, String, Duration) {
    let started = Instant::now();
    let (code, _, body) = http(
        address,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        ),
    );
    (code, body, started.elapsed())
}

/// When the page says its nodes were observed (RFC 3339, as the page prints it).
fn observed_at(page: &str) -> Option<String> {
    let rest = page.split_once("Nodes observed <time datetime=\"")?.1;
    Some(rest.split_once('"')?.0.to_owned())
}

/// A process this test started: SIGTERM and wait on drop.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill(2) of the child this test spawned (its pid, not a group).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.0.wait();
    }
}

fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_stale_status_is_served_at_once_and_renewed_behind_and_a_never_observed_controller_waits_once()
{
    if skip_without_tools() {
        return;
    }
    let base = free_ports(NODES_IP, NODES as u16);
    let ports = free_ports(CONTROLLER_IP, 2);
    let listen = format!("{CONTROLLER_IP}:{ports}");
    let grpc = format!("{CONTROLLER_IP}:{}", ports + 1);
    let (cluster, _) = up_with_controller("console-stale", spec(base), &listen, &grpc);
    let token = std::fs::read_to_string(cluster.path().join(".cairn/controller.token"))
        .expect("the controller's token")
        .trim()
        .to_owned();
    wait_for("every VM running", Duration::from_secs(120), || {
        let (_, page, _) = get(&listen, &token, "/vms?state=running");
        page.contains("3 of 3 VMs").then_some(())
    });

    // Every node slow: an observation now takes at least 2 × SLOW_MS.
    for n in 0..NODES {
        let answer = fault(cluster.path(), &format!("slow n{n} {SLOW_MS}"));
        assert!(answer.starts_with("ok"), "slow n{n}: {answer}");
    }
    // Something happens: an unsigned pause, refused and recorded as an event,
    // which makes the status stale.
    let before_event = controller::events::rfc3339(reconciler::state::now_ms());
    let (code, _, _) = http(
        &listen,
        &format!(
            "POST /api/v1/pause HTTP/1.1\r\nHost: {listen}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(
        (400..500).contains(&code),
        "an unsigned pause is refused: {code}"
    );
    let stale_since = Instant::now();
    let (code, page, took) = get(&listen, &token, "/");
    assert_eq!(code, 200);
    assert!(
        took < PAGE_BUDGET,
        "the stale status is served at once, not after observing slow nodes: {took:?}"
    );
    assert!(
        page.contains("a newer observation is being made"),
        "the page says a newer status is on its way: {}",
        page.split_once("<main>").map_or(&page[..], |p| p.1)
    );
    let stale_observed = observed_at(&page).expect("the page shows its status's age");
    assert!(
        stale_observed < before_event,
        "the stale status was observed before the event: {stale_observed} vs {before_event}"
    );
    // Renewed behind the pages: a later load shows an observation made after the
    // event, and no load waited for it.
    let mut slowest = took;
    let renewed = wait_for(
        "a status observed after the event",
        Duration::from_secs(60),
        || {
            let (code, page, took) = get(&listen, &token, "/");
            assert_eq!(code, 200);
            slowest = slowest.max(took);
            observed_at(&page).filter(|at| *at > before_event)
        },
    );
    let renewal = stale_since.elapsed();
    eprintln!(
        "stale page served in {took:?}; renewed behind it after {renewal:?} (observed {renewed}); slowest page meanwhile {slowest:?}"
    );
    assert!(
        renewal >= Duration::from_millis(SLOW_MS),
        "the renewal really observed the slow nodes: {renewal:?}"
    );
    assert!(
        slowest < PAGE_BUDGET,
        "no page load waited for the renewal: {slowest:?}"
    );

    // A controller that never observed: restarted with the nodes still slow.
    let pid_path = cluster.path().join(".cairn/dev/controller.pid");
    let pid: i32 = std::fs::read_to_string(&pid_path)
        .expect("controller.pid")
        .trim()
        .parse()
        .expect("a pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("its command line");
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(args.iter().any(|a| a == "controller"), "{args:?}");
    // SAFETY: kill(2) of the controller this test's dev cluster started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_for("the controller stopped", Duration::from_secs(30), || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    let log = std::fs::File::create(cluster.path().join(".cairn/dev/controller.log"))
        .expect("controller log");
    let child = std::process::Command::new(&args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("the controller starts again");
    // Stopped and reaped on drop, before the cluster's `dev down`; `dev down`
    // would stop it too (its pid is in controller.pid).
    std::fs::write(&pid_path, format!("{}\n", child.id())).expect("controller.pid");
    let _controller = Reaped(child);
    let started = Instant::now();
    wait_for(
        "the controller listens again",
        Duration::from_secs(30),
        || std::net::TcpStream::connect(&listen).ok().map(|_| ()),
    );
    wait_for(
        "the controller has its applied commit",
        Duration::from_secs(30),
        || {
            let (code, page, _) = get(&listen, &token, "/tenants");
            (code == 200 && !page.contains("Nothing applied yet")).then_some(())
        },
    );
    let (code, page, first) = get(&listen, &token, "/");
    assert_eq!(code, 200);
    assert!(
        observed_at(&page).is_some() && !page.contains("Nothing applied yet"),
        "the first page shows the status it waited for"
    );
    let (code, _, second) = get(&listen, &token, "/");
    assert_eq!(code, 200);
    eprintln!(
        "restarted controller, nodes slow: first overview {first:?} (it waited; {:?} after the start), the next {second:?}",
        started.elapsed()
    );
    assert!(
        first >= Duration::from_secs(1),
        "with no status yet the first page waits for the observation of the slow nodes: {first:?}"
    );
    assert!(
        first < Duration::from_millis(4 * SLOW_MS),
        "it waited for the one observation in flight, not for one of its own after it: {first:?}"
    );
    assert!(
        second < PAGE_BUDGET,
        "once observed, pages no longer wait: {second:?}"
    );
    for n in 0..NODES {
        fault(cluster.path(), &format!("slow n{n} 0"));
    }
}
