//! The node's `/metrics` (`--metrics-listen ADDR`): what each VM uses, with its VM,
//! tenant and SLA class as labels, and the node's totals against its capacity, in the
//! Prometheus text format (0.0.4). Read-only and unauthenticated, like any exporter;
//! it says nothing the node's own Observe does not.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use proto::v1;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::node::Node;

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family: its help, type and samples.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
    }
}

/// The text of `/metrics` for these VM statuses and node usage.
pub fn render(vms: &[v1::VmStatus], usage: &v1::NodeUsage) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    let running: Vec<&v1::VmStatus> = vms
        .iter()
        .filter(|vm| vm.state == v1::VmState::Running as i32)
        .collect();
    let labels = |vm: &v1::VmStatus| {
        format!(
            "vm=\"{}\",tenant=\"{}\",sla=\"{}\"",
            escape(&vm.name),
            escape(&vm.tenant),
            escape(&vm.sla)
        )
    };
    type Pick = fn(&v1::VmStatus) -> f64;
    let per_vm: [(&str, &str, &str, Pick); 11] = [
        (
            "cairn_node_vm_cpu_seconds_total",
            "counter",
            "CPU time of the VM's VMM process (every thread).",
            |vm| vm.usage.as_ref().map_or(0.0, |u| u.cpu_ns as f64 / 1e9),
        ),
        (
            "cairn_node_vm_resident_bytes",
            "gauge",
            "Resident memory of the VM's VMM process.",
            |vm| vm.usage.as_ref().map_or(0.0, |u| u.resident_bytes as f64),
        ),
        (
            "cairn_node_vm_ksm_merging_pages",
            "gauge",
            "Pages of the VM that KSM merged (/proc/PID/ksm_merging_pages).",
            |vm| {
                vm.usage
                    .as_ref()
                    .map_or(0.0, |u| u.ksm_merging_pages as f64)
            },
        ),
        (
            "cairn_node_vm_ksm_shared_bytes",
            "gauge",
            "Bytes of the VM that KSM merged.",
            |vm| vm.usage.as_ref().map_or(0.0, |u| u.ksm_shared_bytes as f64),
        ),
        (
            "cairn_node_vm_disk_read_bytes_total",
            "counter",
            "Bytes the guest read from its disks.",
            |vm| vm.usage.as_ref().map_or(0.0, |u| u.disk_bytes_read as f64),
        ),
        (
            "cairn_node_vm_disk_written_bytes_total",
            "counter",
            "Bytes the guest wrote to its disks.",
            |vm| {
                vm.usage
                    .as_ref()
                    .map_or(0.0, |u| u.disk_bytes_written as f64)
            },
        ),
        (
            "cairn_node_vm_network_receive_frames_total",
            "counter",
            "Frames delivered to the guest's NICs.",
            |vm| vm.usage.as_ref().map_or(0.0, |u| u.net_rx_frames as f64),
        ),
        (
            "cairn_node_vm_network_transmit_frames_total",
            "counter",
            "Frames the guest sent on its NICs.",
            |vm| vm.usage.as_ref().map_or(0.0, |u| u.net_tx_frames as f64),
        ),
        (
            "cairn_node_vm_cpu_weight",
            "gauge",
            "CPU weight of the VM's cgroup (cgroup v2 scale), as read back.",
            |vm| vm.cgroup.as_ref().map_or(0.0, |c| c.cpu_weight as f64),
        ),
        (
            "cairn_node_vm_cgroup_drift",
            "gauge",
            "Values of the VM's cgroup that differ from what its class asks.",
            |vm| vm.cgroup.as_ref().map_or(0.0, |c| c.drift.len() as f64),
        ),
        (
            "cairn_node_vm_zswapped_bytes",
            "gauge",
            "The VM's pages held compressed by zswap, uncompressed (cgroup v2 memory.stat zswapped; 0 on v1).",
            |vm| vm.usage.as_ref().map_or(0.0, |u| u.zswapped_bytes as f64),
        ),
    ];
    for (name, kind, help, pick) in per_vm {
        f.header(name, kind, help);
        for vm in &running {
            f.sample(name, &labels(vm), pick(vm));
        }
    }
    let node: [(&str, &str, f64); 19] = [
        (
            "cairn_node_cpus",
            "Online CPUs of the node.",
            f64::from(usage.cpus),
        ),
        (
            "cairn_node_memory_bytes",
            "Memory of the node (MemTotal).",
            usage.memory_bytes as f64,
        ),
        (
            "cairn_node_memory_available_bytes",
            "Memory available now (MemAvailable).",
            usage.memory_available_bytes as f64,
        ),
        (
            "cairn_node_vm_vcpus",
            "vCPUs of the running VMs.",
            f64::from(usage.vm_vcpus),
        ),
        (
            "cairn_node_vm_memory_bytes",
            "Memory of the running VMs, as defined.",
            usage.vm_memory_bytes as f64,
        ),
        (
            "cairn_node_vms_resident_bytes",
            "Resident memory of every running VM's VMM.",
            usage.vm_resident_bytes as f64,
        ),
        (
            "cairn_node_ksm_run",
            "/sys/kernel/mm/ksm/run (1: merging).",
            f64::from(usage.ksm_run),
        ),
        (
            "cairn_node_ksm_pages_shared",
            "Pages KSM keeps for merged content (/sys/kernel/mm/ksm/pages_shared).",
            usage.ksm_pages_shared as f64,
        ),
        (
            "cairn_node_ksm_pages_sharing",
            "Pages mapped onto KSM pages: what KSM saves (/sys/kernel/mm/ksm/pages_sharing).",
            usage.ksm_pages_sharing as f64,
        ),
        (
            "cairn_node_ksm_saved_bytes",
            "Memory KSM saves (pages_sharing times the page size).",
            (usage.ksm_pages_sharing * usage.page_size) as f64,
        ),
        (
            "cairn_node_vms_ksm_merging_pages",
            "The sum of the VMs' KSM-merged pages.",
            usage.vm_ksm_merging_pages as f64,
        ),
        (
            "cairn_node_memory_pressure_some_avg10",
            "PSI memory some avg10, percent (-1: no PSI).",
            usage.memory_pressure_some_avg10,
        ),
        (
            "cairn_node_cpu_pressure_some_avg10",
            "PSI cpu some avg10, percent (-1: no PSI).",
            usage.cpu_pressure_some_avg10,
        ),
        (
            "cairn_node_zswap_enabled",
            "1 when zswap is on (/sys/module/zswap/parameters/enabled; the host's setting).",
            f64::from(u8::from(usage.zswap_enabled)),
        ),
        (
            "cairn_node_zswap_pool_bytes",
            "zswap's compressed pool (/proc/meminfo Zswap).",
            usage.zswap_pool_bytes as f64,
        ),
        (
            "cairn_node_zswapped_bytes",
            "Pages zswap holds, uncompressed (/proc/meminfo Zswapped).",
            usage.zswapped_bytes as f64,
        ),
        (
            "cairn_node_zswap_saved_bytes",
            "Memory zswap saves against keeping its pages uncompressed (Zswapped - Zswap).",
            usage.zswapped_bytes.saturating_sub(usage.zswap_pool_bytes) as f64,
        ),
        (
            "cairn_node_swap_total_bytes",
            "Swap behind zswap (/proc/meminfo SwapTotal).",
            usage.swap_total_bytes as f64,
        ),
        (
            "cairn_node_swap_free_bytes",
            "Swap free (/proc/meminfo SwapFree).",
            usage.swap_free_bytes as f64,
        ),
    ];
    for (name, help, value) in node {
        f.header(name, "gauge", help);
        f.sample(name, "", value);
    }
    f.header(
        "cairn_node_cgroup_info",
        "gauge",
        "How SLA classes are enforced: 1 with the cgroup version (\"none\" when they are not).",
    );
    let version = if usage.cgroup_version.is_empty() {
        "none"
    } else {
        usage.cgroup_version.as_str()
    };
    f.sample(
        "cairn_node_cgroup_info",
        &format!("version=\"{version}\""),
        1.0,
    );
    out
}

/// What `/metrics` shows now.
pub async fn scrape(node: &Node) -> String {
    let vms = node.vms.statuses().await;
    let (version, detail) = node.vms.cgroup_summary();
    let usage = crate::vms::sla::node_usage(
        &vms,
        &version,
        &detail,
        node.config.sla.preempt_below_available,
        node.config.sla.preempt_above_cpu_pressure,
    );
    render(&vms, &usage)
}

/// Serves `GET /metrics` on `listen` (HTTP/1.0-style: one request per connection).
pub async fn serve(node: Arc<Node>, listen: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let node = node.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16384 {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&request);
                let target = line.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = if line.starts_with("GET ")
                    && (target == "/metrics" || target.starts_with("/metrics?"))
                {
                    ("200 OK", scrape(&node).await)
                } else {
                    (
                        "404 Not Found",
                        "only GET /metrics is served here\n".to_string(),
                    )
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vms_carry_vm_tenant_and_sla_labels_and_the_node_its_totals() {
        let vm = v1::VmStatus {
            name: "web-0".into(),
            tenant: "shop \"eu\"".into(),
            sla: "spot".into(),
            state: v1::VmState::Running as i32,
            usage: Some(v1::VmUsage {
                cpu_ns: 1_500_000_000,
                ksm_merging_pages: 7,
                zswapped_bytes: 8192,
                ..Default::default()
            }),
            ..Default::default()
        };
        let usage = v1::NodeUsage {
            cgroup_version: "v1".into(),
            ksm_pages_sharing: 3,
            page_size: 4096,
            zswap_enabled: true,
            zswap_pool_bytes: 1 << 20,
            zswapped_bytes: 5 << 20,
            swap_total_bytes: 512 << 20,
            ..Default::default()
        };
        let text = render(&[vm], &usage);
        assert!(text.contains(
            "cairn_node_vm_cpu_seconds_total{vm=\"web-0\",tenant=\"shop \\\"eu\\\"\",sla=\"spot\"} 1.5"
        ), "{text}");
        assert!(text.contains("cairn_node_ksm_saved_bytes 12288"), "{text}");
        for line in [
            "cairn_node_zswap_enabled 1",
            "cairn_node_zswap_pool_bytes 1048576",
            "cairn_node_zswapped_bytes 5242880",
            "cairn_node_zswap_saved_bytes 4194304",
            "cairn_node_swap_total_bytes 536870912",
            "cairn_node_vm_zswapped_bytes{vm=\"web-0\",tenant=\"shop \\\"eu\\\"\",sla=\"spot\"} 8192",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(
            text.contains("cairn_node_cgroup_info{version=\"v1\"} 1"),
            "{text}"
        );
    }
}
