//! A real failover of a lost site and the failback (issue 18), on a real two-site dev
//! cluster (`examples/dr`, east-1 on 127.0.0.74, west-1 on 127.0.0.75): db's guest
//! writes a pattern at east (192 KiB across a stripe unit's end); once a snapshot taken after it is at west,
//! west-1 is stopped (SIGSTOP) while the guest writes 64 KiB more, and east-1 is
//! killed with its VMM (kill -9 of its process group: the site's power is lost);
//! `cairn failover --site east` starts db at west from its DR copy and the guest
//! reads the same checksum there; east-1 returns and neither runs db nor writes into
//! the DR copy; `cairn failback --site east` ships west's writes back as a delta and
//! db runs at east with both patterns; `cairn apply` then replicates to west again.

use std::process::Command;
use std::time::{Duration, Instant};

use super::{have, now_ms, port_on, replicated_after, vm_rows};
use crate::TempDir;
use crate::engine::{Cluster, copy_specs, kvm_usable};

/// `cairn vm disk-io db OP . --disk data` over a range: the guest's crc32c.
fn guest(cluster: &Cluster, op: &str, offset: &str, length: &str, seed: &str) -> String {
    let run = cluster.cairn(&[
        "vm", "disk-io", "db", op, ".", "--disk", "data", "--offset", offset, "--length", length,
        "--seed", seed,
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    run.stdout
        .lines()
        .find_map(|l| l.strip_prefix("crc32c "))
        .expect("a crc32c line")
        .to_owned()
}

/// The number just before `unit` in `text`.
fn figure(text: &str, unit: &str) -> u64 {
    let head = &text[..text.find(unit).expect(unit)];
    head.rsplit(' ')
        .next()
        .unwrap_or_default()
        .parse()
        .expect("a number")
}

#[test]
fn a_lost_site_fails_over_with_its_data_stays_fenced_when_it_returns_and_fails_back() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here, and the cycle runs db's guest");
        return;
    }
    if !have("qemu-img") {
        eprintln!("skipped: qemu-img (qemu-utils) is not installed");
        return;
    }
    let dir = TempDir::new("c-dr-failover");
    copy_specs(&crate::repo_root().join("examples/dr"), &dir.0);
    let cluster_file = dir.0.join("cluster.kdl");
    let text = std::fs::read_to_string(&cluster_file)
        .expect("read cluster.kdl")
        .replace(
            "127.0.0.21:7100",
            &format!("127.0.0.74:{}", port_on("127.0.0.74")),
        )
        .replace(
            "127.0.0.22:7100",
            &format!("127.0.0.75:{}", port_on("127.0.0.75")),
        );
    std::fs::write(&cluster_file, text).expect("write cluster.kdl");
    let cluster = Cluster { dir };
    let up = cluster.cairn(&["dev", "up", "."]);
    assert_eq!(up.code, 0, "{up:?}");
    let apply = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{apply:?}");

    // The guest writes 192 KiB at east (across a stripe unit's end); a snapshot taken after it reaches west.
    guest(&cluster, "write-pattern", "960KiB", "192KiB", "7");
    let first = guest(&cluster, "checksum", "960KiB", "192KiB", "0");
    let written = now_ms();
    let point = replicated_after(&cluster, written);

    // East's last writes never reach west: west-1's agent is stopped (SIGSTOP)
    // while db's guest writes 64 KiB and east snapshots them.
    let pid_of = |name: &str| {
        cluster
            .pids()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
            .expect(name)
    };
    let signal = |signal: &str, target: String| {
        let sent = Command::new("kill")
            .args(["-s", signal, "--", &target])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill -s {signal} {target}");
    };
    let (east, west) = (pid_of("east-1"), pid_of("west-1"));
    signal("STOP", west.to_string());
    guest(&cluster, "write-pattern", "8MiB", "64KiB", "5");
    let unshipped = guest(&cluster, "checksum", "8MiB", "64KiB", "0");
    std::thread::sleep(Duration::from_millis(1500));

    // East's power is lost: its agent and db's VMM, kill -9 as one process group.
    let lost = now_ms();
    signal("KILL", format!("-{east}"));
    signal("CONT", west.to_string());
    let started = Instant::now();
    while crate::engine::alive(east) {
        assert!(started.elapsed() < Duration::from_secs(10), "east-1 died");
        std::thread::sleep(Duration::from_millis(50));
    }

    let over = cluster.cairn(&["failover", "--site", "east", "."]);
    eprintln!("{}{}", over.stdout, over.stderr);
    assert_eq!(over.code, 0, "{over:?}");
    assert!(
        over.stdout.contains(
            "failover db: site east -> west (epoch 1): running and healthy on west-1 from auto-"
        ),
        "{over:?}"
    );
    let from = over
        .stdout
        .split(" from ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .expect("the snapshot")
        .to_owned();
    let at: u64 = from
        .strip_prefix("auto-")
        .and_then(|ms| ms.parse().ok())
        .expect("auto-MS");
    assert!(from >= point, "{from} is at least {point}");
    let rto_ms = figure(&over.stdout, " ms after the command started");
    // The data is the source's at its last replicated snapshot.
    assert_eq!(
        guest(&cluster, "checksum", "960KiB", "192KiB", "0"),
        first,
        "db's data at west"
    );
    // East's unshipped writes are not there.
    let before_them = guest(&cluster, "checksum", "8MiB", "64KiB", "0");
    assert_ne!(before_them, unshipped);
    eprintln!(
        "figures: RPO {} ms at the loss (west-1 was stopped for east's last writes), RTO {rto_ms} ms (failover command to db running healthy at west)",
        lost.saturating_sub(at)
    );

    // Writes at the DR site, to be shipped back.
    guest(&cluster, "write-pattern", "5MiB", "128KiB", "9");
    let second = guest(&cluster, "checksum", "5MiB", "128KiB", "0");

    // East returns (same data dir): its copy of db is never started or moved from,
    // and its shipping into the DR copy is refused.
    let up = cluster.cairn(&["dev", "up", "."]);
    assert_eq!(up.code, 0, "{up:?}");
    let started = Instant::now();
    let log = cluster.path().join(".cairn/dev/east-1/node.log");
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("it accepts no replication") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "east-1's shipping into the DR copy is refused: {text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let plan = cluster.cairn(&["plan", "."]);
    eprintln!("{}", plan.stdout);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(plan.stdout.contains("its site failed over"), "{plan:?}");
    let apply = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{apply:?}");
    let json = cluster.status_json();
    assert_eq!(vm_rows(&json), [("db", "west-1", "running")], "{json}");
    assert_eq!(guest(&cluster, "checksum", "960KiB", "192KiB", "0"), first);
    assert_eq!(guest(&cluster, "checksum", "5MiB", "128KiB", "0"), second);
    let again = cluster.cairn(&["failover", "--site", "east", "."]);
    assert_eq!(again.code, 1, "{again:?}");

    // Failback: west's writes go back as a delta, db runs at east with both.
    let back = cluster.cairn(&["failback", "--site", "east", "."]);
    eprintln!("{}{}", back.stdout, back.stderr);
    assert_eq!(back.code, 0, "{back:?}");
    assert!(
        back.stdout
            .contains("failback db: site west -> east (epoch 1): running and healthy on east-1"),
        "{back:?}"
    );
    assert!(
        back.stdout.contains("shipped as a delta from auto-"),
        "{back:?}"
    );
    // East's own writes after that snapshot are discarded, counted, not mixed in.
    assert!(
        back.stdout.contains("; 64KiB written at east after auto-"),
        "{back:?}"
    );
    assert_eq!(
        guest(&cluster, "checksum", "8MiB", "64KiB", "0"),
        before_them
    );
    assert_eq!(guest(&cluster, "checksum", "960KiB", "192KiB", "0"), first);
    assert_eq!(guest(&cluster, "checksum", "5MiB", "128KiB", "0"), second);
    // Replication to west resumes from the plan.
    let apply = cluster.cairn(&["apply", ".", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{apply:?}");
    let resumed = now_ms();
    replicated_after(&cluster, resumed);
}
