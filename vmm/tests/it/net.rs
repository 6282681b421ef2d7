//! virtio-net end to end: the built-in guest on a real tap answers ARP and ping from
//! the host side of the tap, in a network namespace of the test's own.

use std::process::Command;
use std::time::Duration;

use crate::support::{TestNamespace, VmProcess, kvm_available};

const TIMEOUT: Duration = Duration::from_secs(10);
const GUEST_MAC: &str = "02:ca:00:00:00:02";
const GUEST_IP: &str = "10.213.0.2";
const HOST_IP: &str = "10.213.0.1";

/// A network namespace holding one tap with the host's address; deleted on drop.
type TapNamespace = TestNamespace;

/// `None` (with the reason printed) where this host cannot make one.
fn tap_namespace(test: &str) -> Option<TapNamespace> {
    if Command::new("ping").arg("-V").output().is_err() {
        eprintln!("skipping {test}: no ping (Debian package iputils-ping)");
        return None;
    }
    TestNamespace::new(
        test,
        "cairn-vmmnet",
        &[
            "ip link set lo up",
            "ip tuntap add dev vmtap0 mode tap vnet_hdr",
            &format!("ip addr add {HOST_IP}/24 dev vmtap0"),
            "ip link set vmtap0 up",
        ],
    )
}

#[test]
fn the_builtin_guest_answers_arp_and_ping_through_its_tap() {
    let test = "the_builtin_guest_answers_arp_and_ping_through_its_tap";
    if !kvm_available(test) {
        return;
    }
    let Some(namespace) = tap_namespace(test) else {
        return;
    };
    let nic = format!("tap=vmtap0,mac={GUEST_MAC},ipv4={GUEST_IP}");
    let mut vm = VmProcess::spawn_via(
        &["ip", "netns", "exec", &namespace.name],
        tempfile::tempdir().expect("temp dir"),
        &["--memory", "32MiB", "--nic", &nic],
    );
    let status = vm.wait_status(TIMEOUT, |status| {
        status.nics.first().is_some_and(|nic| nic.driver_ok)
    });
    assert_eq!(status.nics[0].tap, "vmtap0");
    assert_eq!(status.nics[0].mac, GUEST_MAC);

    let ping = namespace.run(&format!("ping -c 5 -i 0.2 -W 2 {GUEST_IP}"));
    let report = String::from_utf8_lossy(&ping.stdout);
    println!("{report}");
    assert!(
        ping.status.success() && report.contains("5 received"),
        "ping of the guest failed: {report}{}",
        String::from_utf8_lossy(&ping.stderr)
    );
    let neighbour = namespace.run(&format!("ip neigh show {GUEST_IP} dev vmtap0"));
    let neighbour = String::from_utf8_lossy(&neighbour.stdout);
    assert!(
        neighbour.contains(GUEST_MAC),
        "the host learnt the guest's MAC by ARP: {neighbour:?}"
    );

    let status = vm.status();
    let nic = &status.nics[0];
    // One ARP request and five echo requests in, their answers out (the kernel may
    // add IPv6 neighbour discovery, which the guest receives and ignores).
    assert!(status.net_replies >= 6, "{status:#?}");
    assert!(nic.rx_frames >= 6 && nic.tx_frames >= 6, "{nic:#?}");
    // rx_dropped may be non-zero: the kernel sends IPv6 router solicitations as soon
    // as the tap is up, which can be before the guest's driver is.
    assert_eq!(nic.tx_errors, 0, "{nic:#?}");
    assert!(vm.console().contains("cairn-guest: network device up"));

    // The tap deleted and made again (what the node's repair does): the VMM attaches
    // to the new one and the guest answers again without a restart.
    for command in [
        "ip link del vmtap0",
        "ip tuntap add dev vmtap0 mode tap vnet_hdr",
        &format!("ip addr add {HOST_IP}/24 dev vmtap0"),
        "ip link set vmtap0 up",
    ] {
        assert!(namespace.run(command).status.success(), "{command}");
    }
    vm.wait_status(TIMEOUT, |status| status.nics[0].tap_reattached >= 1);
    let again = namespace.run(&format!("ping -c 3 -i 0.2 -W 2 {GUEST_IP}"));
    let report = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success() && report.contains("3 received"),
        "after the tap was made again: {report}"
    );
}

#[test]
fn a_nic_on_a_tap_that_does_not_exist_is_refused_with_the_name() {
    let test = "a_nic_on_a_tap_that_does_not_exist_is_refused_with_the_name";
    if !kvm_available(test) {
        return;
    }
    let mut vm = VmProcess::spawn(&["--memory", "32MiB", "--nic", "tap=cairn-nosuch0"]);
    let status = vm.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(2));
    let stderr = vm.stderr();
    assert!(
        stderr.contains("cannot attach to the tap cairn-nosuch0")
            && stderr.contains("no network device named cairn-nosuch0"),
        "{stderr}"
    );
}

/// The bridge `br0`'s port for `mac` (`bridge fdb`), if it learnt one.
fn fdb_port(namespace: &TapNamespace, mac: &str) -> Option<String> {
    let output = namespace.run("bridge fdb show br br0");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| line.starts_with(mac) && !line.contains("permanent"))
        .and_then(|line| {
            let mut fields = line.split_whitespace();
            fields.find(|field| *field == "dev")?;
            fields.next().map(str::to_string)
        })
}

/// Issue 17: after a live migration the destination announces the guest's NIC (a
/// gratuitous ARP) before the guest runs, so the bridge moves the guest's MAC to the
/// destination's tap without the guest sending anything (the built-in guest never
/// sends unasked). Both VMMs in this test's namespace: taps vmtap0 (source) and vmtap1
/// (destination) on bridge br0 with the host's address, the stream over the
/// namespace's own loopback.
#[test]
fn a_migrated_nic_announces_itself_and_the_bridge_moves_it_to_the_new_tap() {
    let test = "a_migrated_nic_announces_itself_and_the_bridge_moves_it_to_the_new_tap";
    if !kvm_available(test) {
        return;
    }
    let Some(namespace) = tap_namespace(test) else {
        return;
    };
    namespace.run_all(&[
        &format!("ip addr del {HOST_IP}/24 dev vmtap0"),
        "ip tuntap add dev vmtap1 mode tap vnet_hdr",
        "ip link add br0 type bridge",
        "ip link set vmtap0 master br0",
        "ip link set vmtap1 master br0",
        &format!("ip addr add {HOST_IP}/24 dev br0"),
        "ip link set vmtap1 up",
        "ip link set br0 up",
    ]);
    let prefix = ["ip", "netns", "exec", namespace.name.as_str()];
    let nic = |tap: &str| format!("tap={tap},mac={GUEST_MAC},ipv4={GUEST_IP}");
    let source_nic = nic("vmtap0");
    let mut source = VmProcess::spawn_via(
        &prefix,
        tempfile::tempdir().expect("temp dir"),
        &["--memory", "32MiB", "--nic", &source_nic],
    );
    source.wait_status(TIMEOUT, |status| {
        status.nics.first().is_some_and(|nic| nic.driver_ok) && status.heartbeat_total > 3
    });
    let ping = namespace.run(&format!("ping -c 2 -i 0.2 -W 2 {GUEST_IP}"));
    assert!(ping.status.success(), "the source's guest answers");
    assert_eq!(fdb_port(&namespace, GUEST_MAC).as_deref(), Some("vmtap0"));

    let destination_nic = nic("vmtap1");
    let mut destination = VmProcess::spawn_via(
        &prefix,
        tempfile::tempdir().expect("temp dir"),
        &[
            "--memory",
            "32MiB",
            "--nic",
            &destination_nic,
            "--incoming",
            "127.0.0.1:0",
        ],
    );
    let mut events =
        std::io::BufReader::new(destination.child.stdout.take().expect("stdout piped"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut events, &mut line).expect("the incoming event");
    let event: serde_json::Value = serde_json::from_str(&line).expect("an event");
    let to = event["listening"].as_str().expect("listening").to_string();
    let migrate = source
        .client()
        .call(&vmm::control::Request::Migrate {
            to,
            max_downtime_ms: 50,
            stop_and_copy: false,
        })
        .expect("migrate");
    assert!(migrate.ok, "{migrate:?}");
    let ready = crate::support::wait_until(TIMEOUT, || {
        source
            .client()
            .call(&vmm::control::Request::MigrationStatus)
            .ok()
            .and_then(|response| response.migration)
            .is_some_and(|status| status.phase == "ready-to-commit")
    });
    assert!(ready, "the migration reached ready-to-commit");
    // Still on the source's port: nothing was announced before the commit.
    assert_eq!(fdb_port(&namespace, GUEST_MAC).as_deref(), Some("vmtap0"));
    let committed = source
        .client()
        .call(&vmm::control::Request::MigrateCommit)
        .expect("commit");
    assert!(committed.ok, "{committed:?}");
    let moved = crate::support::wait_until(Duration::from_secs(2), || {
        fdb_port(&namespace, GUEST_MAC).as_deref() == Some("vmtap1")
    });
    assert!(
        moved,
        "the bridge moved the guest's MAC to the destination's tap: {:?}",
        fdb_port(&namespace, GUEST_MAC)
    );
    let mut lines = Vec::new();
    for _ in 0..2 {
        line.clear();
        std::io::BufRead::read_line(&mut events, &mut line).expect("an event");
        lines.push(line.clone());
    }
    assert!(
        lines[0].contains("\"announced\"") && lines[0].contains("\"frames\":1"),
        "the destination announced its NIC before it started: {lines:?}"
    );
    let ping = namespace.run(&format!("ping -c 3 -i 0.2 -W 2 {GUEST_IP}"));
    let report = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success() && report.contains("3 received"),
        "the guest answers on the destination: {report}"
    );
}
