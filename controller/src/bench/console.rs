//! `cairn controller bench --console`: how long the web console's pages take to
//! load from a running controller over HTTP, on the bench's dev cluster once the
//! measured commit's VMs run (issue 23's budget: under 200 ms for the quickstart).
//!
//! Each page is loaded `runs` times three ways: cold (the shared observation and
//! status made stale first, as after an event or a minute unused: the page
//! shows the stale status with its age and a new one is made behind it), in use
//! (1.2 s after the previous load, as an operator clicks through: the keeper has
//! kept the status young) and at once (right after another load). Then, once:
//! how long the revalidation behind a cold load took (an observation of every
//! node, the state store read and the status parsed), and the overview of a
//! controller that never observed (the one load that waits for it).
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
            stale(handle);
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
            "  {path:<14} cold {cold:>7.1} ms  in use {used:>7.1} ms  at once {warm:>7.1} ms  ({} KiB; cold {:.1}x, in use {:.1}x /healthz)",
            size / 1024,
            cold / floor.max(0.001),
            used / floor.max(0.001)
        );
    }
    // The revalidation behind a cold load, and a controller that never observed.
    let (mut behind, mut never) = (vec![], vec![]);
    for _ in 0..runs {
        stale(handle);
        let made = Instant::now();
        get(handle, "/").await?;
        let deadline = made + Duration::from_secs(120);
        while handle
            .shared
            .status_view
            .peek()
            .is_none_or(|(_, _, stale)| stale)
        {
            if Instant::now() > deadline {
                bail!("the status was not revalidated within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        behind.push(made.elapsed());
        handle.shared.observed.forget();
        handle.shared.status_view.forget();
        let (status, _, took) = get(handle, "/").await?;
        if status != 200 {
            bail!("GET / answered {status}");
        }
        never.push(took);
    }
    let (behind, never) = (median_ms(behind), median_ms(never));
    println!(
        "  behind a cold load: the status renewed {behind:.1} ms after it (observing every node, reading the state store, parsing); the page did not wait for it"
    );
    println!(
        "  never observed: the overview of a controller with no status yet {never:.1} ms (the one load that waits; the controller observes from its start, so only a load in its first seconds can)"
    );
    println!(
        "  ratio to /healthz: slowest cold {:.1}x, slowest in use {:.1}x",
        worst_cold / floor.max(0.001),
        worst_use / floor.max(0.001)
    );
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

/// Makes the shared observation and status stale, as a recorded event does.
fn stale(handle: &crate::Handle) {
    handle.shared.observed.invalidate();
    handle.shared.status_view.invalidate();
}
