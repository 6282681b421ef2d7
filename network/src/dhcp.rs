//! DHCP for tenant networks (issue 19 item 4): one `dnsmasq` per tenant network
//! with a gateway, per node, in the tenant's router namespace, bound to the
//! network's gateway device (the router side of the gateway leg).
//!
//! Only static leases are handed out: the hosts file maps each VM NIC's MAC (from
//! the placement) to its IPAM address and the VM's name, so a MAC that is not in
//! the plan gets no offer (dnsmasq logs "no address available") and the DHCP server
//! never hands out an address IPAM did not give. The offer carries the subnet mask,
//! the gateway as router (option 3) and as DNS server (option 6: the same dnsmasq
//! answers the network's VM names from the hosts file; every other name under
//! `.cairn` is answered locally, not found; other names are forwarded to
//! [`DhcpSpec::upstream`], the node's resolvers, for an external network, and
//! refused for an isolated one), the segment MTU (option 26, forced: clients that do not ask still get
//! it) and a lease of [`LEASE_SECS`].
//!
//! Broadcasts never leave a node (no flood entry in the segment), so each node's
//! instance answers the VMs on that node. The hosts file still lists every NIC of
//! the network, local and remote: a VM that moves renews at its new node's server
//! (the same gateway address, `dhcp-authoritative`) and keeps its address.
//!
//! Files live in the directory the caller gives (cairn-node: `<data
//! dir>/segments/dhcp`), per network `<tenant>.<network>.{conf,hosts,pid,leases,log}`.
//! A changed configuration (gateway, prefix, MTU, the device's interface index)
//! restarts the instance; changed hosts only rewrite the hosts file and send SIGHUP
//! (dnsmasq rereads it). The process is a child of the caller (the node agent), in
//! its process group, and a reaper thread waits for it.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::NetworkError;
use crate::netns::NetNs;
use crate::nl::Rtnl;
use crate::overlay::{format_mac, gateway_device_name, router_netns_name, slaac_address};

/// Lease time handed out, in seconds. The addresses are static, so a lease only
/// bounds how long a guest keeps an address after its VM's NIC left the plan.
pub const LEASE_SECS: u32 = 3600;

/// How long a started dnsmasq may take to bind its DHCP socket.
const START_TIMEOUT: Duration = Duration::from_secs(3);

/// One static lease.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DhcpHost {
    /// The NIC's MAC.
    pub mac: [u8; 6],
    /// Its IPAM address.
    pub ipv4: Ipv4Addr,
    /// The VM's name (DHCP host name, and the name DNS answers).
    pub name: String,
}

/// DHCP for one tenant network on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpSpec {
    /// Tenant.
    pub tenant: String,
    /// Network.
    pub network: String,
    /// The gateway (router and DNS option, server identifier).
    pub gateway: Ipv4Addr,
    /// The network's prefix length.
    pub prefix_len: u8,
    /// The segment MTU (option 26).
    pub mtu: u32,
    /// Static leases.
    pub hosts: Vec<DhcpHost>,
    /// Where names outside `.cairn` are forwarded: the node's resolvers for an
    /// external network ([`system_resolvers`]); empty for an isolated network, whose
    /// gateway refuses them.
    pub upstream: Vec<Ipv4Addr>,
    /// The network's IPv6 gateway (its /64), when it has one: the server then sends
    /// router advertisements (SLAAC prefix, the gateway as router and DNS server,
    /// the segment MTU) and answers the VMs' SLAAC addresses by name.
    pub ipv6_gateway: Option<Ipv6Addr>,
}

/// The IPv4 resolvers of a `resolv.conf` text that a tenant router namespace can
/// reach through its uplink: loopback and unspecified addresses are the node's own
/// (a stub such as systemd-resolved's 127.0.0.53) and are left out, and so are IPv6
/// resolvers (egress is IPv4).
pub fn resolvers_in(resolv_conf: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        if let Some(Ok(IpAddr::V4(a))) = words.next().map(str::parse::<IpAddr>)
            && !a.is_loopback()
            && !a.is_unspecified()
            && !out.contains(&a)
        {
            out.push(a);
        }
    }
    out
}

/// The node's resolvers for external networks: `/etc/resolv.conf`'s, or, when it
/// names only a local stub, systemd-resolved's upstreams
/// (`/run/systemd/resolve/resolv.conf`). Empty when neither names one.
pub fn system_resolvers() -> Vec<Ipv4Addr> {
    ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"]
        .iter()
        .map(|p| resolvers_in(&std::fs::read_to_string(p).unwrap_or_default()))
        .find(|r| !r.is_empty())
        .unwrap_or_default()
}

/// The files of one network's instance.
#[derive(Debug, Clone)]
pub struct DhcpFiles {
    /// dnsmasq's configuration (`--conf-file`).
    pub conf: PathBuf,
    /// Static leases (`dhcp-hostsfile`, reread on SIGHUP).
    pub hosts: PathBuf,
    /// The VMs' names for DNS (`addn-hosts`, reread on SIGHUP): every planned NIC
    /// answers by name, with a lease or not.
    pub names: PathBuf,
    /// The process id.
    pub pid: PathBuf,
    /// dnsmasq's lease database.
    pub leases: PathBuf,
    /// dnsmasq's log (`log-facility`, with `log-dhcp`).
    pub log: PathBuf,
}

impl DhcpFiles {
    /// The files of `tenant`/`network` under `dir`.
    pub fn new(dir: &Path, tenant: &str, network: &str) -> Self {
        let base = |ext: &str| dir.join(format!("{tenant}.{network}.{ext}"));
        Self {
            conf: base("conf"),
            hosts: base("hosts"),
            names: base("names"),
            pid: base("pid"),
            leases: base("leases"),
            log: base("log"),
        }
    }
}

/// The dnsmasq binary: `dnsmasq` on the PATH, else `/usr/sbin/dnsmasq` (Debian's
/// `dnsmasq-base`).
pub fn dnsmasq_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("dnsmasq"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let sbin = PathBuf::from("/usr/sbin/dnsmasq");
        sbin.is_file().then_some(sbin)
    })
}

fn netmask(prefix_len: u8) -> Ipv4Addr {
    let len = u32::from(prefix_len.min(32));
    Ipv4Addr::from(if len == 0 { 0 } else { u32::MAX << (32 - len) })
}

/// dnsmasq's configuration for `spec`, bound to `interface` (index `ifindex`: a
/// device made again gets a new index, and a dnsmasq bound to the old one must be
/// restarted, so the index is part of the configuration).
pub fn config_text(spec: &DhcpSpec, files: &DhcpFiles, interface: &str, ifindex: u32) -> String {
    let mask = netmask(spec.prefix_len);
    let network = Ipv4Addr::from(u32::from(spec.gateway) & u32::from(mask));
    let domain = format!("{}.{}.cairn", spec.network, spec.tenant);
    [
        format!(
            "# cairn: DHCP of tenant {} network {} (gateway device {interface}, ifindex {ifindex})",
            spec.tenant, spec.network
        ),
        "bind-interfaces".into(),
        format!("interface={interface}"),
        "except-interface=lo".into(),
        "no-resolv".into(),
        "no-hosts".into(),
        "no-poll".into(),
        format!("domain={domain}"),
        format!("local=/{domain}/"),
        // Other networks' names are never asked of the node's resolvers.
        "local=/cairn/".into(),
        "dhcp-authoritative".into(),
        format!(
            "dhcp-range=set:cairn,{network},static,{mask},{}s",
            LEASE_SECS
        ),
        format!("dhcp-hostsfile={}", files.hosts.display()),
        format!("addn-hosts={}", files.names.display()),
        format!("dhcp-option=option:router,{}", spec.gateway),
        format!("dhcp-option=option:dns-server,{}", spec.gateway),
        format!("dhcp-option-force=option:mtu,{}", spec.mtu),
        format!("dhcp-leasefile={}", files.leases.display()),
        // The pid file is cairn's record, written at the start: dnsmasq would
        // rewrite its own after binding its sockets (unlink, create, write), so a
        // drift check right after a start could find none (seen under load).
        "pid-file=".into(),
        format!("log-facility={}", files.log.display()),
        "log-dhcp".into(),
    ]
    .into_iter()
    .chain(ipv6_lines(spec, interface))
    .chain(upstream_lines(&spec.upstream))
    .chain([String::new()])
    .collect::<Vec<_>>()
    .join("\n")
}

/// IPv6: router advertisements only (no DHCPv6: guests take their addresses by
/// SLAAC, which their MACs decide), every 60 s and on solicitation, with the /64 of
/// the gateway (autonomous), the segment MTU and the gateway as DNS server (RDNSS).
fn ipv6_lines(spec: &DhcpSpec, interface: &str) -> Vec<String> {
    let Some(gw) = spec.ipv6_gateway else {
        return Vec::new();
    };
    vec![
        "enable-ra".into(),
        format!(
            "dhcp-range=set:cairn6,::,constructor:{interface},ra-only,64,{}s",
            LEASE_SECS
        ),
        format!("ra-param={interface},mtu:{},60", spec.mtu),
        format!("dhcp-option=option6:dns-server,[{gw}]"),
    ]
}

/// An external network's forwarding: names without a dot and private reverse
/// lookups stay local, the rest goes to the resolvers in order. None: `no-resolv`
/// and no server, so dnsmasq answers REFUSED.
fn upstream_lines(upstream: &[Ipv4Addr]) -> Vec<String> {
    if upstream.is_empty() {
        return Vec::new();
    }
    let mut lines = vec!["domain-needed".to_owned(), "bogus-priv".to_owned()];
    lines.extend(upstream.iter().map(|a| format!("server={a}")));
    lines
}

/// The hosts file: `MAC,ADDRESS,NAME` per static lease, sorted.
pub fn hosts_text(spec: &DhcpSpec) -> String {
    let hosts: BTreeSet<String> = spec
        .hosts
        .iter()
        .map(|h| format!("{},{},{}\n", format_mac(&h.mac), h.ipv4, h.name))
        .collect();
    hosts.into_iter().collect()
}

fn failed(ns: &NetNs, spec_tenant: &str, spec_network: &str, problem: String) -> NetworkError {
    NetworkError::Segment {
        node: ns.node().to_owned(),
        tenant: spec_tenant.to_owned(),
        network: spec_network.to_owned(),
        problem,
    }
}

/// The running dnsmasq of `files`: the pid in its pid file, if that process is
/// alive (not a zombie) and runs with this configuration.
pub fn running_pid(files: &DhcpFiles) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(&files.pid)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let conf = format!("--conf-file={}", files.conf.display());
    let ours = cmdline.split(|b| *b == 0).any(|arg| arg == conf.as_bytes());
    ours.then_some(pid)
}

/// The names file: `ADDRESS NAME.<network>.<tenant>.cairn NAME` per static lease.
pub fn names_text(spec: &DhcpSpec) -> String {
    let domain = format!("{}.{}.cairn", spec.network, spec.tenant);
    let domain = domain.as_str();
    let names: BTreeSet<String> = spec
        .hosts
        .iter()
        .map(|h| format!("{} {}.{domain} {}\n", h.ipv4, h.name, h.name))
        .chain(spec.ipv6_gateway.into_iter().flat_map(|gw| {
            spec.hosts.iter().map(move |h| {
                let v6 = slaac_address(gw, &h.mac);
                format!("{v6} {}.{domain} {}\n", h.name, h.name)
            })
        }))
        .collect();
    names.into_iter().collect()
}

/// Whether process `pid` itself holds a UDP socket bound to port 67. The table
/// `/proc/PID/net/udp` lists every socket of the process's network namespace, so
/// a socket counts only when one of the process's own descriptors is it: a
/// dnsmasq killed a moment ago may still hold its socket while its successor
/// has not yet exec'd (the fresh CI run saw that race).
fn dhcp_socket_bound(pid: u32) -> bool {
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/udp")) else {
        return false;
    };
    let inodes: BTreeSet<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let local = fields.get(1)?;
            local
                .ends_with(":0043")
                .then(|| fields.get(9).map(|i| format!("socket:[{i}]")))
                .flatten()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.contains(target.to_string_lossy().as_ref()))
    })
}

fn signal(pid: u32, sig: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) with a pid read from our own pid file, checked to be our
    // dnsmasq by its command line just before.
    unsafe { libc::kill(pid, sig) == 0 }
}

fn stop_pid(pid: u32) {
    if !signal(pid, libc::SIGTERM) {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        });
        if !alive {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(pid, libc::SIGKILL);
}

/// The gateway device's interface index in the router namespace, if it exists.
fn gateway_ifindex(ns: &NetNs, spec: &DhcpSpec) -> Result<Option<u32>, NetworkError> {
    let router = NetNs::named_for_node(router_netns_name(ns, &spec.tenant), ns.node());
    if !router.exists() {
        return Ok(None);
    }
    let mut rtnl = Rtnl::open(&router).map_err(|e| NetworkError::netlink(&router, e))?;
    Ok(rtnl
        .link(&gateway_device_name(&spec.tenant, &spec.network))
        .map_err(|e| NetworkError::netlink(&router, e))?
        .map(|l| l.index))
}

/// Differences of the running DHCP server from `spec` (empty: converged).
pub fn dhcp_drift(ns: &NetNs, dir: &Path, spec: &DhcpSpec) -> Vec<String> {
    let files = DhcpFiles::new(dir, &spec.tenant, &spec.network);
    let interface = gateway_device_name(&spec.tenant, &spec.network);
    let ifindex = match gateway_ifindex(ns, spec) {
        Ok(Some(i)) => i,
        Ok(None) => return vec![format!("dhcp: the gateway device {interface} is missing")],
        Err(e) => return vec![format!("dhcp: cannot read the gateway device: {e}")],
    };
    let mut drift = Vec::new();
    if running_pid(&files).is_none() {
        drift.push("dhcp: dnsmasq is not running".to_owned());
    }
    let conf = std::fs::read_to_string(&files.conf).unwrap_or_default();
    if conf != config_text(spec, &files, &interface, ifindex) {
        drift.push(
            if conf.contains(&format!("interface={interface}\n"))
                && !conf.contains(&format!("ifindex {ifindex})"))
            {
                format!("dhcp: dnsmasq is bound to an older {interface} (now ifindex {ifindex})")
            } else {
                "dhcp: configuration differs (gateway, prefix, MTU or upstream resolvers)"
                    .to_owned()
            },
        );
    }
    let hosts = std::fs::read_to_string(&files.hosts).unwrap_or_default();
    let names = std::fs::read_to_string(&files.names).unwrap_or_default();
    if hosts != hosts_text(spec) || names != names_text(spec) {
        drift.push(format!(
            "dhcp: static leases differ ({} kept, want {})",
            hosts.lines().count(),
            spec.hosts.len()
        ));
    }
    drift
}

fn write_file(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Converges the DHCP server of `spec` on the node whose namespace is `ns` (the
/// segment, with its gateway and router namespace, must be made already). Returns
/// the changes made.
pub fn converge_dhcp(ns: &NetNs, dir: &Path, spec: &DhcpSpec) -> Result<Vec<String>, NetworkError> {
    let fail = |problem: String| failed(ns, &spec.tenant, &spec.network, problem);
    let binary = dnsmasq_binary().ok_or_else(|| {
        fail("DHCP needs dnsmasq (Debian package dnsmasq-base), which is not installed".into())
    })?;
    std::fs::create_dir_all(dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    let files = DhcpFiles::new(dir, &spec.tenant, &spec.network);
    let interface = gateway_device_name(&spec.tenant, &spec.network);
    let ifindex = gateway_ifindex(ns, spec)?.ok_or_else(|| {
        fail(format!(
            "DHCP needs the gateway device {interface} in the tenant's router namespace: the segment is not made"
        ))
    })?;
    let conf = config_text(spec, &files, &interface, ifindex);
    let hosts = hosts_text(spec);
    let names = names_text(spec);
    let io = |path: &Path, e: std::io::Error| fail(format!("cannot write {}: {e}", path.display()));
    let running = running_pid(&files);
    let same_conf = std::fs::read_to_string(&files.conf).is_ok_and(|c| c == conf);
    let same_hosts = std::fs::read_to_string(&files.hosts).is_ok_and(|h| h == hosts)
        && std::fs::read_to_string(&files.names).is_ok_and(|n| n == names);
    let mut done = Vec::new();
    match running {
        Some(pid) if same_conf => {
            if !same_hosts {
                write_file(&files.hosts, &hosts).map_err(|e| io(&files.hosts, e))?;
                write_file(&files.names, &names).map_err(|e| io(&files.names, e))?;
                signal(pid, libc::SIGHUP);
                done.push(format!(
                    "dhcp {}/{}: static leases reloaded ({} hosts)",
                    spec.tenant,
                    spec.network,
                    spec.hosts.len()
                ));
            }
            return Ok(done);
        }
        Some(pid) => {
            stop_pid(pid);
            done.push(format!(
                "dhcp {}/{}: stopped dnsmasq {pid} (configuration changed)",
                spec.tenant, spec.network
            ));
        }
        None => {}
    }
    write_file(&files.hosts, &hosts).map_err(|e| io(&files.hosts, e))?;
    write_file(&files.names, &names).map_err(|e| io(&files.names, e))?;
    write_file(&files.conf, &conf).map_err(|e| io(&files.conf, e))?;
    let router = NetNs::named_for_node(router_netns_name(ns, &spec.tenant), ns.node());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&files.log)
        .map_err(|e| io(&files.log, e))?;
    let log_err = log.try_clone().map_err(|e| io(&files.log, e))?;
    let conf_arg = format!("--conf-file={}", files.conf.display());
    let mut child = router
        .run(|| {
            std::process::Command::new(&binary)
                .arg("--keep-in-foreground")
                .arg(&conf_arg)
                .stdin(std::process::Stdio::null())
                .stdout(log)
                .stderr(log_err)
                .spawn()
        })?
        .map_err(|e| fail(format!("cannot start {}: {e}", binary.display())))?;
    let pid = child.id();
    write_file(&files.pid, &format!("{pid}\n")).map_err(|e| io(&files.pid, e))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&files.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            return Err(fail(format!(
                "dnsmasq exited at start ({status}): {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            )));
        }
        if dhcp_socket_bound(pid) {
            break;
        }
        if Instant::now() >= deadline {
            stop_pid(pid);
            let _ = child.wait();
            return Err(fail(format!(
                "dnsmasq {pid} bound no DHCP socket within {} s (see {})",
                START_TIMEOUT.as_secs(),
                files.log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Reap it whenever it exits (the node keeps no handle: the pid file is the record).
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    done.push(format!(
        "dhcp {}/{}: started dnsmasq {pid} on {interface} ({} static leases)",
        spec.tenant,
        spec.network,
        spec.hosts.len()
    ));
    Ok(done)
}

/// Stops the DHCP server of `tenant`/`network` (if running) and removes its files.
/// Returns what it did.
pub fn stop_dhcp(dir: &Path, tenant: &str, network: &str) -> Vec<String> {
    let files = DhcpFiles::new(dir, tenant, network);
    let mut done = Vec::new();
    if let Some(pid) = running_pid(&files) {
        stop_pid(pid);
        done.push(format!("dhcp {tenant}/{network}: stopped dnsmasq {pid}"));
    }
    for path in [
        &files.conf,
        &files.hosts,
        &files.names,
        &files.pid,
        &files.leases,
        &files.log,
    ] {
        let _ = std::fs::remove_file(path);
    }
    done
}

/// The networks (`tenant`, `network`) with a DHCP configuration under `dir`.
pub fn configured(dir: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".conf")?;
            let (tenant, network) = stem.split_once('.')?;
            Some((tenant.to_owned(), network.to_owned()))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_67_socket_counts_only_for_the_process_that_holds_it() {
        // The fresh CI run's race: a dying dnsmasq still held port 67 in the
        // namespace while its successor had not exec'd, and the namespace-wide
        // table said the successor was ready.
        let socket = match std::net::UdpSocket::bind("127.0.0.1:67") {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "skipping: cannot bind 127.0.0.1:67 ({e}); needs root and a free port 67"
                );
                return;
            }
        };
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        assert!(dhcp_socket_bound(std::process::id()), "we hold it");
        assert!(
            !dhcp_socket_bound(other.id()),
            "a process of the same namespace that does not hold it"
        );
        drop(socket);
        assert!(!dhcp_socket_bound(std::process::id()), "closed");
        let _ = other.kill();
        let _ = other.wait();
    }

    fn spec() -> DhcpSpec {
        DhcpSpec {
            tenant: "dev".into(),
            network: "dev-net".into(),
            gateway: Ipv4Addr::new(10, 20, 0, 1),
            prefix_len: 24,
            mtu: 1450,
            hosts: vec![
                DhcpHost {
                    mac: [2, 0, 0, 0, 0, 9],
                    ipv4: Ipv4Addr::new(10, 20, 0, 9),
                    name: "web-1".into(),
                },
                DhcpHost {
                    mac: [2, 0, 0, 0, 0, 5],
                    ipv4: Ipv4Addr::new(10, 20, 0, 5),
                    name: "web-0".into(),
                },
            ],
            upstream: vec![],
            ipv6_gateway: None,
        }
    }

    #[test]
    fn an_ipv6_network_gets_router_advertisements_and_aaaa_names() {
        let files = DhcpFiles::new(Path::new("/d"), "dev", "dev-net");
        assert!(!config_text(&spec(), &files, "cgw0", 7).contains("enable-ra"));
        let v6 = DhcpSpec {
            ipv6_gateway: Some("fd00:20::1".parse().unwrap()),
            ..spec()
        };
        let conf = config_text(&v6, &files, "cgw0", 7);
        for line in [
            "enable-ra\n",
            "dhcp-range=set:cairn6,::,constructor:cgw0,ra-only,64,3600s\n",
            "ra-param=cgw0,mtu:1450,60\n",
            "dhcp-option=option6:dns-server,[fd00:20::1]\n",
        ] {
            assert!(conf.contains(line), "{line:?} missing from\n{conf}");
        }
        let names = names_text(&v6);
        assert!(
            names.contains("fd00:20::ff:fe00:5 web-0.dev-net.dev.cairn web-0\n"),
            "{names}"
        );
        assert!(names.contains("10.20.0.5 web-0.dev-net.dev.cairn web-0\n"));
    }

    #[test]
    fn an_external_network_forwards_to_the_reachable_resolvers_and_an_isolated_one_refuses() {
        let files = DhcpFiles::new(Path::new("/d"), "dev", "dev-net");
        let isolated = config_text(&spec(), &files, "cgw0", 7);
        assert!(isolated.contains("no-resolv\n") && !isolated.contains("server="));
        assert!(isolated.contains("local=/cairn/\n"), "{isolated}");
        let resolvers = resolvers_in(
            "# generated\nsearch example.org\nnameserver 127.0.0.53\nnameserver 10.255.255.53\n\
             nameserver ::1\nnameserver 2001:db8::53\nnameserver 192.0.2.53 # second\n\
             nameserver 10.255.255.53\nnameserver bogus\n",
        );
        assert_eq!(
            resolvers,
            vec![
                Ipv4Addr::new(10, 255, 255, 53),
                Ipv4Addr::new(192, 0, 2, 53)
            ]
        );
        assert!(resolvers_in("nameserver 127.0.0.53\noptions edns0\n").is_empty());
        let external = config_text(
            &DhcpSpec {
                upstream: resolvers,
                ..spec()
            },
            &files,
            "cgw0",
            7,
        );
        assert!(
            external
                .ends_with("domain-needed\nbogus-priv\nserver=10.255.255.53\nserver=192.0.2.53\n"),
            "{external}"
        );
        assert!(external.contains("local=/dev-net.dev.cairn/\nlocal=/cairn/\n"));
    }

    #[test]
    fn the_configuration_serves_only_static_leases_with_gateway_dns_and_mtu() {
        let files = DhcpFiles::new(Path::new("/d"), "dev", "dev-net");
        let conf = config_text(&spec(), &files, "cgw0", 7);
        for line in [
            "interface=cgw0\n",
            "bind-interfaces\n",
            "except-interface=lo\n",
            "dhcp-range=set:cairn,10.20.0.0,static,255.255.255.0,3600s\n",
            "dhcp-option=option:router,10.20.0.1\n",
            "dhcp-option=option:dns-server,10.20.0.1\n",
            "dhcp-option-force=option:mtu,1450\n",
            "dhcp-hostsfile=/d/dev.dev-net.hosts\n",
            "pid-file=\n",
        ] {
            assert!(conf.contains(line), "{line:?} missing from\n{conf}");
        }
        assert!(conf.contains("ifindex 7)"));
        assert_eq!(
            hosts_text(&spec()),
            "02:00:00:00:00:05,10.20.0.5,web-0\n02:00:00:00:00:09,10.20.0.9,web-1\n"
        );
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(30), Ipv4Addr::new(255, 255, 255, 252));
    }

    #[test]
    fn configured_networks_are_read_from_the_file_names() {
        let dir = std::env::temp_dir().join(format!("cairn-dhcp-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("dev.dev-net.conf"), "").unwrap();
        std::fs::write(dir.join("dev.dev-net.hosts"), "").unwrap();
        std::fs::write(dir.join("ops.ops-net.conf"), "").unwrap();
        assert_eq!(
            configured(&dir),
            vec![
                ("dev".to_owned(), "dev-net".to_owned()),
                ("ops".to_owned(), "ops-net".to_owned())
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
