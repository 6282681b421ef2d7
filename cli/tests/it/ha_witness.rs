//! The quorum witness in HA (issue 16: a node fences when it has "no lease from the
//! controller AND no majority of its site's peers, or the witness where a site has
//! one"; issue 22 item 3), with real processes: `cairn witness`, the controller and
//! the nodes of a dev cluster inside a private network namespace of the test's own
//! (`ha_faults::PrivateNet`), links cut with nftables. "Never twice" is checked on the
//! VMMs' heartbeat records (`ha_faults::Heartbeats`), not by sampling processes.
//!
//! - A node cut off from the controller and its peers but still reaching the witness
//!   keeps its HA VM (it holds `node/NAME`), and the controller, which reaches the
//!   witness too, does not restart it elsewhere; once the node loses the witness as
//!   well it fences and the VM runs elsewhere: exactly one side at any time.
//! - The witness out of reach of both: the node fences and nothing restarts it
//!   elsewhere until the controller reaches the witness again.
//! - `kill -9` of the witness and a restart: grant numbers never go backwards, and
//!   nobody else is granted a key its recorded holder may still hold.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::TempDir;
use crate::ha::{alive, vmm_pid};
use crate::ha_faults::{
    Faults, Heartbeats, address_of, cut_off, death_of, edit_spec, needs, nft, vmm_exit_code,
};

/// The site's witness, inside the test's namespace.
const WITNESS: &str = "127.0.0.180";
/// The site's alternate witness, for the test that takes the preferred one away.
const ALTERNATE: &str = "127.0.0.181";

fn with_witness(dir: &Path) {
    edit_spec(dir);
    let path = dir.join("cluster.kdl");
    let text = std::fs::read_to_string(&path).expect("read cluster.kdl");
    assert!(text.contains("ha-reserve nodes=1"), "{text}");
    let text = text.replacen(
        "ha-reserve nodes=1",
        &format!("ha-reserve nodes=1\n    witness address=\"{WITNESS}:7400\""),
        1,
    );
    std::fs::write(&path, text).expect("write cluster.kdl");
}

fn with_two_witnesses(dir: &Path) {
    with_witness(dir);
    let path = dir.join("cluster.kdl");
    let text = std::fs::read_to_string(&path).expect("read cluster.kdl");
    let text = text.replacen(
        &format!("witness address=\"{WITNESS}:7400\""),
        &format!("witness address=\"{WITNESS}:7400\" alternate=\"{ALTERNATE}:7400\""),
        1,
    );
    std::fs::write(&path, text).expect("write cluster.kdl");
}

/// Drops every packet to or from `address` except those to or from `except`.
fn cut_except(address: &str, except: &str, cut: bool) {
    let table = format!("cairn_witness_cut_{}", address.replace('.', "_"));
    let rules = if cut {
        let chain = |name: &str, hook: &str| {
            format!(
                " chain {name} {{ type filter hook {hook} priority 0; ip saddr {address} ip daddr != {except} drop; ip daddr {address} ip saddr != {except} drop; }}\n"
            )
        };
        format!(
            "table inet {table} {{\n{}{}}}\n",
            chain("out", "output"),
            chain("in", "input")
        )
    } else {
        format!("delete table inet {table}\n")
    };
    nft(&rules);
}

fn lease_of(status: &Value, node: &str) -> Value {
    status["controller"]["leases"]
        .as_array()
        .and_then(|rows| rows.iter().find(|l| l["node"] == node))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Whether `vm` runs on a node other than `node` in `status`.
fn runs_elsewhere(status: &Value, vm: &str, node: &str) -> bool {
    status["vms"].as_array().is_some_and(|vms| {
        vms.iter()
            .any(|v| v["name"] == vm && v["state"] == "running" && v["node"] != node)
    })
}

fn up(tag: &str) -> Option<Faults> {
    up_with(tag, with_witness)
}

fn up_with(tag: &str, edit: fn(&Path)) -> Option<Faults> {
    if !needs(
        "nft",
        "the partitions are nftables rules (apt install nftables)",
    ) {
        return None;
    }
    Faults::up_with(tag, edit)
}

/// On a failing test, prints the quorum and witness lines of every node's, witness's
/// and the controller's log, and web-0's VMM log (a flaky failure on a loaded machine
/// is diagnosed from these; `CAIRN_KEEP_FAILED` keeps the whole directory).
struct LogsOnFailure(std::path::PathBuf);

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&self.0)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|entry| {
                let dir = entry.path();
                [
                    dir.join("node.log"),
                    dir.join("witness.log"),
                    dir.join("vms/web-0/vmm.log"),
                ]
            })
            .filter(|path| path.is_file())
            .collect();
        files.sort();
        files.push(self.0.join("controller.log"));
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| {
                    ["quorum", "witness", "fence", "exited", "lease", "failed"]
                        .iter()
                        .any(|word| l.contains(word))
                })
                .collect();
            eprintln!(
                "----- {} (its last {} of {} quorum, witness, fence and lease lines)",
                path.display(),
                lines.len().min(120),
                lines.len()
            );
            for line in &lines[lines.len().saturating_sub(120)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// web-0 in a fresh cluster: where it runs, that node's address, the heartbeat
/// collector, its VM directory there and its VMM's pid.
struct Watched {
    node: String,
    address: String,
    beats: Heartbeats,
    dir: std::path::PathBuf,
    pid: u32,
}

fn watch_web_0(f: &Faults) -> Watched {
    let node = f.node_of("web-0", &f.ha.status()).expect("web-0 runs");
    let dir = f.vm_dir_on(&node, "web-0");
    Watched {
        address: address_of(&node),
        beats: Heartbeats::watch(f.dev(), "web-0"),
        pid: vmm_pid(&dir).expect("web-0's VMM"),
        dir,
        node,
    }
}

#[test]
fn a_node_cut_off_but_reaching_the_witness_keeps_its_ha_vm_and_only_one_side_ever_runs_it() {
    let Some(f) = up("wit-hold") else {
        return;
    };
    let _logs = LogsOnFailure(f.dev());
    let vm = "web-0";
    let Watched {
        node,
        address,
        beats,
        dir,
        pid,
    } = watch_web_0(&f);

    // Cut from the controller and both peers; the witness is still reached by the
    // node and by the controller.
    cut_except(&address, WITNESS, true);
    let cut = Instant::now();
    let mut saw_hold = None;
    while cut.elapsed() < Duration::from_secs(12) {
        assert!(
            alive(pid),
            "{node} holds the witness grant, yet web-0's VMM stopped {:?} after the cut (exit {:?})",
            cut.elapsed(),
            vmm_exit_code(&dir)
        );
        let status = f.ha.status();
        assert!(
            !runs_elsewhere(&status, vm, &node),
            "web-0 was restarted elsewhere while {node} held the witness grant: {status:#}"
        );
        let lease = lease_of(&status, &node);
        if lease["state"] == "suspect"
            && lease["reason"]
                .as_str()
                .is_some_and(|r| r.contains(&format!("`{node}` holds it")))
        {
            saw_hold.get_or_insert(cut.elapsed());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let held = saw_hold.unwrap_or_else(|| {
        panic!(
            "the controller never said that {node} holds its witness grant: {:#}",
            lease_of(&f.ha.status(), &node)
        )
    });
    eprintln!(
        "{node} cut off but reaching the witness: web-0 kept running for 12 s; the controller saw the node's grant after {held:?}"
    );

    // Now the witness too: the node can renew nothing, fences, and the controller
    // takes the grant and restarts web-0 elsewhere.
    cut_off(&address, true);
    let cut_all = Instant::now();
    let died = death_of(pid, Duration::from_secs(10));
    let fenced_after = cut_all.elapsed();
    assert!(
        died.is_some(),
        "{node} lost the witness too, yet web-0 ran on"
    );
    assert_eq!(vmm_exit_code(&dir), Some(6), "the VMM exited as fenced");
    let moved_to = f.wait_running_elsewhere(vm, &node, Duration::from_secs(60));
    eprintln!(
        "{node} cut from the witness too: web-0 fenced after {fenced_after:?}, running on {moved_to} after {:?}",
        cut_all.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    let spans = beats.never_twice(vm);
    assert!(spans.len() >= 2, "{spans:?}");

    cut_off(&address, false);
    cut_except(&address, WITNESS, false);
    f.wait_lease(&node, "ready", Duration::from_secs(30));
}

#[test]
fn with_the_witness_out_of_reach_of_both_sides_the_node_fences_and_nothing_restarts_its_vm() {
    let Some(f) = up("wit-none") else {
        return;
    };
    let _logs = LogsOnFailure(f.dev());
    let vm = "web-0";
    let Watched {
        node,
        address,
        beats,
        dir,
        pid,
    } = watch_web_0(&f);

    cut_off(WITNESS, true);
    cut_off(&address, true);
    let cut = Instant::now();
    let died = death_of(pid, Duration::from_secs(10));
    assert!(
        died.is_some(),
        "{node} has no lease, no peers and no witness, yet web-0 ran on"
    );
    assert_eq!(vmm_exit_code(&dir), Some(6), "the VMM exited as fenced");
    eprintln!("{node} fenced web-0 after {:?}", cut.elapsed());
    // The controller cannot get the grant: it restarts nothing, however long.
    let mut reason = String::new();
    while cut.elapsed() < Duration::from_secs(15) {
        let status = f.ha.status();
        assert!(
            !runs_elsewhere(&status, vm, &node),
            "web-0 was restarted elsewhere without the witness's consent: {status:#}"
        );
        let lease = lease_of(&status, &node);
        assert_ne!(lease["state"], "failed", "{lease}");
        if let Some(r) = lease["reason"].as_str() {
            reason = r.to_owned();
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        reason.contains("witness has not consented") && reason.contains("unreachable"),
        "{reason}"
    );

    // The controller reaches the witness again (the node still does not): it takes
    // the grant, waits out the margin, and web-0 runs elsewhere.
    cut_off(WITNESS, false);
    let healed = Instant::now();
    let moved_to = f.wait_running_elsewhere(vm, &node, Duration::from_secs(60));
    eprintln!(
        "the witness back for the controller: web-0 running on {moved_to} after {:?}",
        healed.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    let spans = beats.never_twice(vm);
    assert!(spans.len() >= 2, "{spans:?}");
    cut_off(&address, false);
    f.wait_lease(&node, "ready", Duration::from_secs(30));
}

#[test]
fn with_the_preferred_witness_gone_the_nodes_move_to_the_alternate_and_it_decides_alone() {
    let Some(f) = up_with("wit-alt", with_two_witnesses) else {
        return;
    };
    let _logs = LogsOnFailure(f.dev());
    let vm = "web-0";
    let Watched {
        node,
        address,
        beats,
        dir,
        pid,
    } = watch_web_0(&f);
    // The preferred witness is gone for everyone: after 2 s without its answers the
    // controller names the alternate in every grant, and each node keeps it.
    cut_off(WITNESS, true);
    let gone = Instant::now();
    let alternate = format!("{ALTERNATE}:7400");
    for n in 1..=3 {
        let path = f.dev().join(format!("lab-{n}")).join("quorum.json");
        loop {
            let kept: Value = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(Value::Null);
            if kept["witness"] == alternate.as_str() {
                break;
            }
            assert!(
                gone.elapsed() < Duration::from_secs(30),
                "lab-{n} still uses {} 30 s after the preferred witness went",
                kept["witness"]
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!(
        "every node uses the alternate witness {:?} after the preferred went",
        gone.elapsed()
    );
    // One more renewal (T/3 = 1 s), so the controller has heard each node report
    // the alternate as the witness it uses: until then it must assume a node whose
    // last answer may have been lost still claims at the preferred one, and would
    // claim at both (a node cut off in that round is restarted only once the
    // preferred answers again; the first run of this test cut it there).
    std::thread::sleep(Duration::from_millis(2500));
    // The grants still name the alternate (the preferred is still gone: a slow answer
    // of the alternate must not switch the nodes back).
    let kept: Value = serde_json::from_slice(
        &std::fs::read(f.dev().join(&node).join("quorum.json")).expect("quorum.json"),
    )
    .expect("quorum.json is JSON");
    assert_eq!(
        kept["witness"],
        alternate.as_str(),
        "{node} was switched back to the preferred witness while it is gone"
    );
    // Cut off but reaching the alternate: the node keeps web-0 and nothing
    // restarts it.
    cut_except(&address, ALTERNATE, true);
    let cut = Instant::now();
    // What the controller says of the node's grant, sample by sample: it must say at
    // least once that the node holds it at the alternate, and never that it holds it
    // itself there. (One sample alone proves nothing on a loaded machine: a claim of
    // the controller's that timed out reads "unreachable" for that 100 ms round.)
    let holds_it = format!("{alternate}: `{node}` holds it");
    let mut saw_hold = None;
    let mut reasons: Vec<(Duration, String)> = Vec::new();
    while cut.elapsed() < Duration::from_secs(10) {
        assert!(
            alive(pid),
            "{node} holds its grant at the alternate, yet web-0 stopped {:?} after the cut (exit {:?}); the controller said: {reasons:#?}",
            cut.elapsed(),
            vmm_exit_code(&dir)
        );
        let status = f.ha.status();
        assert!(
            !runs_elsewhere(&status, vm, &node),
            "web-0 restarted elsewhere while {node} held its grant at the alternate: {status:#}"
        );
        let reason = lease_of(&status, &node)["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            !reason.contains(&format!("{alternate}: held by the controller")),
            "the controller took {node}'s grant at the alternate {:?} after the cut while web-0 ran there: {reason}",
            cut.elapsed()
        );
        if reason.contains(&holds_it) {
            saw_hold.get_or_insert(cut.elapsed());
        }
        reasons.push((cut.elapsed(), reason));
        std::thread::sleep(Duration::from_millis(300));
    }
    let held = saw_hold.unwrap_or_else(|| {
        panic!("the controller never said \"{holds_it}\" in 10 s: {reasons:#?}")
    });
    eprintln!(
        "{node} cut off but reaching the alternate: web-0 kept running for 10 s; the controller saw the node's grant there after {held:?}"
    );
    // And without the alternate too: fenced, then restarted elsewhere, never twice.
    cut_off(&address, true);
    let cut_all = Instant::now();
    assert!(
        death_of(pid, Duration::from_secs(10)).is_some(),
        "{node} lost both witnesses, yet web-0 ran on"
    );
    let moved_to = f.wait_running_elsewhere(vm, &node, Duration::from_secs(60));
    eprintln!(
        "{node} cut from the alternate too: web-0 running on {moved_to} after {:?}",
        cut_all.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    let spans = beats.never_twice(vm);
    assert!(spans.len() >= 2, "{spans:?}");
    cut_off(&address, false);
    cut_except(&address, ALTERNATE, false);
    cut_off(WITNESS, false);
    f.wait_lease(&node, "ready", Duration::from_secs(30));
}

/// A `cairn witness` process of the test.
struct WitnessProcess {
    child: Child,
}

impl WitnessProcess {
    fn start(listen: &str, dir: &Path, max_lease_ms: u64) -> WitnessProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["witness", "--listen", listen, "--data-dir"])
            .arg(dir)
            .args(["--max-lease-ms", &max_lease_ms.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cairn witness starts");
        let address: std::net::SocketAddr = listen.parse().expect("address");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_err() {
            assert!(Instant::now() < deadline, "the witness did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        WitnessProcess { child }
    }

    fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WitnessProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_witness_killed_and_restarted_never_gives_a_lower_number_nor_a_live_grant_to_another() {
    use proto::auth::{Identity, RequestSigner};
    use proto::witness::{CONTROLLER, WitnessClient, node_key};
    let dir = TempDir::new("witness-kill9");
    let data = dir.0.join("witness");
    std::fs::create_dir_all(&data).expect("data dir");
    let (node, controller) = (
        Identity::generate().expect("key"),
        Identity::generate().expect("key"),
    );
    std::fs::write(
        data.join("trusted-nodes"),
        format!("{} lab-1\n", node.public_key_hex()),
    )
    .expect("trusted-nodes");
    std::fs::write(
        data.join("trusted-controllers"),
        format!("{} cairn-controller\n", controller.public_key_hex()),
    )
    .expect("trusted-controllers");
    let listen = format!("127.0.0.1:{}", crate::engine::free_port());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // The longest lease this witness grants (what a restart waits out), and the
    // lease each claim asks for.
    let max_lease = Duration::from_millis(600);
    let lease_ms = 400;
    let key = node_key("lab-1");
    let claim = |who: &Identity, name: &str| {
        runtime
            .block_on(async {
                let client = WitnessClient::new(
                    &listen,
                    RequestSigner::new(who.clone()),
                    Duration::from_secs(5),
                    None,
                )
                .expect("a witness client");
                client
                    .claim(&key, name, lease_ms)
                    .await
                    .map_err(|s| s.message().to_owned())
            })
            .unwrap_or_else(|e| panic!("claim of {key} as {name}: {e}"))
    };
    let mut numbers = vec![];
    let mut witness = WitnessProcess::start(&listen, &data, max_lease.as_millis() as u64);
    for round in 0..6 {
        // The node and the controller take turns holding node/lab-1.
        let (holder, name, other, other_name) = if round % 2 == 0 {
            (&node, "lab-1", &controller, CONTROLLER)
        } else {
            (&controller, CONTROLLER, &node, "lab-1")
        };
        let grant = claim(holder, name);
        assert!(
            grant.granted && numbers.last().is_none_or(|n| grant.number > *n),
            "round {round}: a new holder gets a higher number than {numbers:?}: {grant:?}"
        );
        numbers.push(grant.number);
        let refused = claim(other, other_name);
        assert!(
            !refused.granted && refused.holder == name && refused.number == grant.number,
            "round {round}: one holder at a time: {refused:?}"
        );

        // kill -9 right after the grant (durable before the answer), and a restart.
        witness.kill_9();
        witness = WitnessProcess::start(&listen, &data, max_lease.as_millis() as u64);
        let restarted = Instant::now();
        // The grant may still be live: nobody else gets the key...
        let refused = claim(other, other_name);
        assert!(
            !refused.granted && refused.holder == name && refused.number == grant.number,
            "round {round}: after the restart {name} may still hold grant {}: {refused:?}",
            grant.number
        );
        // ...and its holder renews it with its number.
        let again = claim(holder, name);
        assert!(
            again.granted && again.number == grant.number,
            "round {round}: the recorded holder renews with its number: {again:?}"
        );
        // Both the renewal and the recovery lapse before the next round's claim.
        std::thread::sleep(
            (max_lease + Duration::from_millis(100)).saturating_sub(restarted.elapsed())
                + Duration::from_millis(lease_ms),
        );
    }
    let book: Value =
        serde_json::from_slice(&std::fs::read(data.join("grants.json")).expect("grants.json"))
            .expect("the grant book is JSON");
    assert_eq!(book["counter"].as_u64(), numbers.last().copied(), "{book}");
    eprintln!("grant numbers across 6 kill -9 restarts: {numbers:?}");
    witness.kill_9();
}
