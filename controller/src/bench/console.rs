//! `cairn controller bench --console`: how long the web console's pages take to
//! load from a running controller over HTTP, on the bench's dev cluster once the
//! measured commit's VMs run (issue 23's budget: under 200 ms for the quickstart).
//!
//! Each page is loaded `runs` times three ways: cold (the shared status forgotten
//! first, so the load observes every node and reads the state store, as the
//! first load after an event or after a minute unused does), in use (1.2 s after
//! the previous load, as an operator clicks through: the renewing task has kept
//! the status young) and at once (right after another load: the same status).
//! The baseline in the same command is `/healthz`: the HTTP floor of this server
//! on this machine.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The pages loaded: every console page that has content on the bench's cluster.
fn pages(vm: &str) -> Vec<String> {
    [
        "/",
        "/topology",
        "/vms",
        &format!("/vms/{vm}"),
        "/syncs",
        "/events",
        "/graph",
        "/tenants",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One GET over a fresh connection: (status, body bytes, time to the last byte).
async fn get(handle: &crate::Handle, path: &str) -> anyhow::Result<(u16, usize, Duration)> {
    let start = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(handle.address)
        .await
        .with_context(|| format!("cannot connect to {}", handle.address))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        handle.address, handle.shared.token
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = vec![];
    stream.read_to_end(&mut answer).await?;
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&answer);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status in the answer to GET {path}"))?;
    Ok((status, answer.len(), took))
}

fn median_ms(mut values: Vec<Duration>) -> f64 {
    values.sort_unstable();
    values
        .get(values.len() / 2)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Loads every page `runs` times cold and warm and prints the medians.
/// `budget_ms`: issue 23's budget for this cluster (200 ms for the quickstart, 1 s
/// for 1,000 nodes and 10,000 VMs).
pub async fn measure(
    handle: &crate::Handle,
    vm: &str,
    runs: usize,
    budget_ms: f64,
) -> anyhow::Result<()> {
    let runs = runs.max(1);
    let mut healthz = vec![];
    for _ in 0..runs {
        let (status, _, took) = get(handle, "/healthz").await?;
        if status != 200 {
            bail!("GET /healthz answered {status}");
        }
        healthz.push(took);
    }
    let floor = median_ms(healthz);
    println!(
        "console bench: each page loaded {runs} times over HTTP from the controller (cold: the shared status forgotten first; in use: 1.2 s after the previous load; at once: loaded again at once); medians"
    );
    println!("  /healthz (baseline, the HTTP floor): {floor:.1} ms");
    let (mut worst_cold, mut worst_use) = (0.0f64, 0.0f64);
    for path in pages(vm) {
        let (mut cold, mut used, mut warm, mut size) = (vec![], vec![], vec![], 0);
        for _ in 0..runs {
            handle.shared.status_view.invalidate();
            let (status, bytes, took) = get(handle, &path).await?;
            if status != 200 {
                bail!("GET {path} answered {status}");
            }
            cold.push(took);
            size = bytes;
            let (_, _, took) = get(handle, &path).await?;
            warm.push(took);
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let (_, _, took) = get(handle, &path).await?;
            used.push(took);
        }
        let (cold, used, warm) = (median_ms(cold), median_ms(used), median_ms(warm));
        worst_cold = worst_cold.max(cold);
        worst_use = worst_use.max(used);
        println!(
            "  {path:<14} cold {cold:>7.1} ms  in use {used:>7.1} ms  at once {warm:>7.1} ms  ({} KiB)",
            size / 1024
        );
    }
    println!(
        "slowest page: cold {worst_cold:.1} ms, in use {worst_use:.1} ms (budget {budget_ms:.0} ms: {} in use, {} cold)",
        if worst_use < budget_ms {
            "met"
        } else {
            "NOT met"
        },
        if worst_cold < budget_ms {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}
