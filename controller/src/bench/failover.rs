//! `cairn controller bench --failover`: a node killed (kill -9 of its agent and every
//! VMM of its process group, as if the power went) → each of its HA VMs running on
//! another node, broken down into detection (the controller's `node failed` event)
//! and restart (the VM seen running elsewhere), medians over `--runs`.
//!
//! Everything is real and made in a temporary directory: three dev nodes (`cairn dev
//! up --gitops`: a bare repository, a signing clone, a controller with leases), and
//! a vm-group of `--vms` diskless HA VMs (a VM with disks waits for its volume's new
//! writer, issue 15). Each run kills the node that runs the most of them, measures,
//! then starts that node again and waits until its lease is ready.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::{cluster_kdl, free_port, median};

fn workloads(vms: usize) -> String {
    format!(
        r#"vm-group "ha" tenant="bench" site="lab" replicas={vms} {{
    cpu 1
    memory "64MiB"
    availability "ha"
    image "tiny"
}}
"#
    )
}

struct Cluster {
    dir: std::path::PathBuf,
    cairn: std::path::PathBuf,
    up: Vec<String>,
    keep: bool,
}

impl Cluster {
    fn cairn(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new(&self.cairn)
            .args(args)
            .current_dir(&self.dir)
            .env("NO_COLOR", "1")
            .output()
            .with_context(|| format!("cannot run cairn {args:?}"))
    }

    fn status(&self) -> Value {
        self.cairn(&["status", ".", "--format", "json"])
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or(Value::Null)
    }

    fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Value) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = f(&self.status()) {
                return Ok(t);
            }
            if Instant::now() > deadline {
                bail!(
                    "{what}: not within {timeout:?} (see {})",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// VM → node of every running VM.
    fn running(status: &Value) -> Vec<(String, String)> {
        status["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["state"] == "running")
            .map(|v| {
                (
                    v["name"].as_str().unwrap_or_default().to_owned(),
                    v["node"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    fn leases_ready(status: &Value) -> bool {
        status["controller"]["leases"]
            .as_array()
            .is_some_and(|l| l.len() == 3 && l.iter().all(|l| l["state"] == "ready"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.cairn(&["dev", "down", "."]);
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One run's figures, ms from the kill.
struct Sample {
    detected_ms: u64,
    restarted_ms: u64,
    vms: usize,
}

fn events_after(
    dir: &Path,
    kind: &str,
    result: &str,
    since_ms: u64,
) -> anyhow::Result<Option<u64>> {
    let token = std::fs::read_to_string(dir.join(".cairn/controller.token"))?;
    let url = std::fs::read_to_string(dir.join(".cairn/controller.url"))?;
    let answer = crate::control::request(
        url.trim(),
        "GET",
        "/api/v1/events",
        Some(token.trim()),
        Duration::from_secs(5),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let events: Value = serde_json::from_str(&answer.body).unwrap_or(Value::Null);
    Ok(events
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == kind && e["result"] == result)
        .filter_map(|e| e["at_unix_ms"].as_u64())
        .filter(|at| *at >= since_ms)
        .min())
}

/// `cairn controller bench --failover`.
pub fn run(vms: usize, runs: usize, keep: bool) -> anyhow::Result<u8> {
    let Some(dir) = super::kvm_and_a_fresh_dir("cairn-failover-bench")? else {
        return Ok(1);
    };
    let ports = [free_port()?, free_port()?, free_port()?];
    std::fs::write(dir.join("cluster.kdl"), cluster_kdl(&ports))?;
    std::fs::write(dir.join("workloads.kdl"), workloads(vms))?;
    let listen = format!("127.0.0.1:{}", free_port()?);
    let grpc = format!("127.0.0.1:{}", free_port()?);
    let cluster = Cluster {
        dir: dir.clone(),
        cairn: std::env::current_exe()?,
        up: [
            "dev",
            "up",
            ".",
            "--gitops",
            "--controller-listen",
            &listen,
            "--controller-grpc-listen",
            &grpc,
        ]
        .map(String::from)
        .to_vec(),
        keep,
    };
    let up: Vec<&str> = cluster.up.iter().map(String::as_str).collect();
    let out = cluster.cairn(&up)?;
    if !out.status.success() {
        bail!(
            "cairn dev up --gitops failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    cluster.wait(
        "every VM running and every lease ready",
        Duration::from_secs(120),
        |s| (Cluster::running(s).len() == vms && Cluster::leases_ready(s)).then_some(()),
    )?;
    println!("{vms} HA VMs on 3 dev nodes (T = 3 s, margin 1 s); {runs} runs\n");
    println!("run  node   VMs  detected (ms)  all running elsewhere (ms)");
    let mut samples = Vec::new();
    for run in 1..=runs {
        let status = cluster.status();
        let running = Cluster::running(&status);
        // The node that runs the most HA VMs.
        let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
        for (_, node) in &running {
            *counts.entry(node.as_str()).or_default() += 1;
        }
        let Some((node, on_node)) = counts.into_iter().max_by_key(|(_, n)| *n) else {
            bail!("no VM runs");
        };
        let node = node.to_owned();
        let victims: Vec<String> = running
            .iter()
            .filter(|(_, n)| *n == node)
            .map(|(v, _)| v.clone())
            .collect();
        let pids: Value =
            serde_json::from_slice(&std::fs::read(dir.join(".cairn/dev/pids.json"))?)?;
        let pid = pids[&node].as_u64().context("the node's pid")?;
        let killed_ms = reconciler::state::now_ms();
        let killed = Instant::now();
        // The agent is its process group's leader, and its VMMs are in the group.
        let status = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{pid}")])
            .status()?;
        if !status.success() {
            bail!("kill -s KILL -- -{pid} failed");
        }
        cluster.wait(
            "the node's HA VMs running elsewhere",
            Duration::from_secs(60),
            |s| {
                let now = Cluster::running(s);
                victims
                    .iter()
                    .all(|v| now.iter().any(|(n, at)| n == v && *at != node))
                    .then_some(())
            },
        )?;
        let restarted_ms = killed.elapsed().as_millis() as u64;
        let detected_ms = events_after(&dir, "node", "failed", killed_ms)?
            .map(|at| at.saturating_sub(killed_ms))
            .unwrap_or(0);
        println!(
            "{run:>3}  {node:<5}  {:>3}  {detected_ms:>13}  {restarted_ms:>26}",
            victims.len()
        );
        samples.push(Sample {
            detected_ms,
            restarted_ms,
            vms: on_node,
        });
        // The node comes back for the next run.
        let out = cluster.cairn(&up)?;
        if !out.status.success() {
            bail!(
                "cairn dev up (the node again) failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cluster.wait("every lease ready again", Duration::from_secs(60), |s| {
            Cluster::leases_ready(s).then_some(())
        })?;
    }
    let detected = median(samples.iter().map(|s| s.detected_ms).collect());
    let restarted = median(samples.iter().map(|s| s.restarted_ms).collect());
    let per_node = median(samples.iter().map(|s| s.vms as u64).collect());
    println!(
        "\nmedian over {runs} runs ({per_node} HA VMs on the killed node): detected {detected} ms, every VM running elsewhere {restarted} ms (restart after detection: {} ms); budget 5000 ms",
        restarted.saturating_sub(detected)
    );
    println!(
        "(detection waits for T + margin = 4 s after the last grant and for the site's peers to report; `running` is read with `cairn status` polling every 50 ms)"
    );
    Ok(0)
}
