//! Security groups with nftables (issue 19), programmed with `nft -j` and read
//! back with `nft -j list` for drift, in the node's namespace.
//!
//! Bridge conntrack is missing on the build machines, br_netfilter is present
//! (network/ARCHITECTURE.md), so a NIC's group is enforced in two tables that
//! are replaced together in one `nft` transaction:
//!
//! - `table bridge cairn_sg`, chain `mark` (forward, priority -200, before
//!   br_netfilter): a frame leaving on a guarded tap gets the NIC's mark.
//! - `table inet cairn_sg`: chain `zone` (prerouting, priority -300) puts every
//!   port of a tenant network (taps, VXLAN, gateway leg) in the network's
//!   conntrack zone, so two tenants' overlapping addresses never share a
//!   connection entry; chain `fw` (forward, reached through br_netfilter) jumps
//!   per mark to the NIC's chain `nic_<tap>`: established/related accepted,
//!   invalid dropped, each allow rule of the NIC's groups, then drop.
//!
//! Every rule carries a comment `cairn:<hash>` of its chain and expression, so
//! the read-back compares rule lists by comment, in order: a rule deleted,
//! added or reordered by hand is drift, and [`apply_firewall`] repairs it by
//! replacing both tables. (A rule edited in place under its comment is not seen:
//! nft normalises expressions on read-back, so they are not compared.)
//!
//! The same rule builder programs a tenant's router namespace
//! ([`apply_router_firewall`]): forwarding between the tenant's networks is
//! dropped unless an allow rule admits it to a guarded NIC's address (stateless
//! there, because a distributed gateway routes a request and its reply on
//! different nodes; the stateful check is the NIC's chain).

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::NetworkError;
use crate::netns::NetNs;

/// Name of both tables (bridge and inet families).
pub const TABLE: &str = "cairn_sg";
/// Name of the node's guest-guard table (bridge family).
pub const GUARD_TABLE: &str = "cairn_guard";
/// Name of the router namespace's table.
pub const ROUTER_TABLE: &str = "cairn_rt";
/// The bits of the packet mark cairn uses for guarded NICs.
pub const MARK_BASE: u32 = 0x0c00_0000;

/// Protocol of an allow rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP (all types).
    Icmp,
    /// Any protocol.
    Any,
}

impl Proto {
    /// Parses `tcp`, `udp`, `icmp` or `any`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            "icmp" => Some(Self::Icmp),
            "any" | "" => Some(Self::Any),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Any => "any",
        }
    }
}

/// An IPv4 prefix `a.b.c.d/n` or an IPv6 prefix `x:y::/n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Prefix {
    /// Address.
    pub addr: IpAddr,
    /// Length.
    pub len: u8,
}

impl Prefix {
    /// Parses `a.b.c.d/n` or `x:y::/n` (or a bare address: /32, /128).
    pub fn parse(text: &str) -> Option<Self> {
        let (a, l) = text
            .split_once('/')
            .map_or((text, None), |(a, l)| (a, Some(l)));
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = match l {
            Some(l) => l.parse().ok()?,
            None => max,
        };
        (len <= max).then_some(())?;
        Some(Self { addr, len })
    }

    /// The payload protocol nft matches its addresses with (`ip`, `ip6`).
    fn family(&self) -> &'static str {
        if self.addr.is_ipv4() { "ip" } else { "ip6" }
    }

    fn is_host(&self) -> bool {
        self.len == if self.addr.is_ipv4() { 32 } else { 128 }
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// One allow rule (ingress to the NICs that list its group).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AllowRule {
    /// The group it comes from (for messages).
    pub group: String,
    /// Source prefix.
    pub from: Prefix,
    /// Destination prefix; `None`: any address of the NIC.
    pub to: Option<Prefix>,
    /// Protocol.
    pub proto: Proto,
    /// First and last destination port (TCP/UDP only).
    pub ports: Option<(u16, u16)>,
}

impl std::fmt::Display for AllowRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: allow {}", self.group, self.proto.as_str())?;
        match self.ports {
            Some((a, b)) if a == b => write!(f, " {a}")?,
            Some((a, b)) => write!(f, " {a}-{b}")?,
            None => {}
        }
        write!(f, " from {}", self.from)?;
        if let Some(to) = self.to {
            write!(f, " to {to}")?;
        }
        Ok(())
    }
}

/// A NIC with at least one security group on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardedNic {
    /// Its tap.
    pub tap: String,
    /// Its address, when IPAM gave one (used by the router namespace's rules).
    pub ipv4: Option<Ipv4Addr>,
    /// The allow rules of every group it lists, in order.
    pub rules: Vec<AllowRule>,
    /// Its network's DHCP server (the gateway, where cairn serves DHCP): its answers
    /// (UDP 67 to 68) are admitted, since a DHCP exchange is not one connection to
    /// conntrack (the request goes to the broadcast address).
    #[serde(default)]
    pub dhcp_server: Option<Ipv4Addr>,
}

/// A tenant network's ports on this node and its conntrack zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zone {
    /// Zone id, 1..=65535 ([`zone_id`]).
    pub id: u16,
    /// Bridge ports: taps, VXLAN device, gateway leg.
    pub ports: Vec<String>,
}

/// The node's security-group state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallSpec {
    /// Guarded NICs.
    pub nics: Vec<GuardedNic>,
    /// Conntrack zones per tenant network.
    pub zones: Vec<Zone>,
    /// Every guest tap on a tenant network here (guarded or not): the guest guard
    /// (table `bridge cairn_guard`) drops what only a gateway may send from them:
    /// DHCP and DHCPv6 server answers, IPv6 router advertisements and redirects and
    /// IPv4 ICMP redirects, and every VLAN-tagged frame.
    #[serde(default)]
    pub guests: Vec<String>,
}

/// The conntrack zone of a tenant network (FNV of tenant/network, never 0).
pub fn zone_id(tenant: &str, network: &str) -> u16 {
    let z = (crate::fnv1a(format!("zone/{tenant}/{network}").as_bytes()) & 0xffff) as u16;
    z.max(1)
}

fn nic_chain(tap: &str) -> String {
    format!("nic_{tap}")
}

fn comment_for(chain: &str, expr: &Value) -> String {
    let h = crate::fnv1a(format!("{chain}\n{expr}").as_bytes());
    format!("cairn:{:012x}", h & 0xffff_ffff_ffff)
}

/// One rule of the desired ruleset.
#[derive(Debug, Clone)]
struct Rule {
    family: &'static str,
    table: &'static str,
    chain: String,
    expr: Value,
    what: String,
}

#[derive(Debug, Clone)]
struct Chain {
    family: &'static str,
    table: &'static str,
    name: String,
    hook: Option<(&'static str, i32, &'static str)>,
}

fn eq(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

fn prefix(p: Prefix) -> Value {
    if p.is_host() {
        json!(p.addr.to_string())
    } else {
        json!({"prefix": {"addr": p.addr.to_string(), "len": p.len}})
    }
}

fn allow_expr(rule: &AllowRule, daddr: Option<Ipv4Addr>) -> Value {
    let ip = rule.from.family();
    let mut e = vec![eq(
        json!({"payload": {"protocol": ip, "field": "saddr"}}),
        prefix(rule.from),
    )];
    if let Some(to) = rule.to {
        e.push(eq(
            json!({"payload": {"protocol": to.family(), "field": "daddr"}}),
            prefix(to),
        ));
    }
    if let Some(d) = daddr {
        e.push(eq(
            json!({"payload": {"protocol": "ip", "field": "daddr"}}),
            json!(d.to_string()),
        ));
    }
    proto_and_ports(rule, "dport", &mut e);
    Value::Array(e)
}

/// Appends the rule's protocol and port matches (`field`: `dport` for requests,
/// `sport` for answers) and the verdict.
fn proto_and_ports(rule: &AllowRule, field: &str, e: &mut Vec<Value>) {
    match rule.proto {
        Proto::Any => {}
        p => e.push(eq(json!({"meta": {"key": "l4proto"}}), json!(p.as_str()))),
    }
    if let (Some((a, b)), Proto::Tcp | Proto::Udp) = (rule.ports, rule.proto) {
        let right = if a == b {
            json!(a)
        } else {
            json!({"range": [a, b]})
        };
        e.push(eq(
            json!({"payload": {"protocol": "th", "field": field}}),
            right,
        ));
    }
    e.push(json!({"accept": null}));
}

fn established() -> Value {
    json!([
        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
        {"accept": null}
    ])
}

fn invalid_drop() -> Value {
    json!([
        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["invalid"]}},
        {"drop": null}
    ])
}

fn counted_drop() -> Value {
    json!([{"counter": null}, {"drop": null}])
}

/// The guest guard: frames entering the bridge from a guest's tap that only a
/// network's gateway may send are dropped before anything else sees them (bridge
/// prerouting, stateless, so it needs neither conntrack nor br_netfilter): a
/// guest's DHCP server answers (UDP source port 67), DHCPv6 server or relay answers
/// (source port 547), ICMPv6 router advertisements and redirects, IPv4 ICMP
/// redirects, and VLAN-tagged frames (802.1Q, 802.1ad). Without it a guest running
/// a DHCP server or radvd hands its neighbours its own address and router, and the
/// first answer wins.
fn guard_desired(guests: &[String], chains: &mut Vec<Chain>, rules: &mut Vec<Rule>) {
    if guests.is_empty() {
        return;
    }
    chains.push(Chain {
        family: "bridge",
        table: GUARD_TABLE,
        name: "guests".into(),
        hook: Some(("prerouting", -300, "accept")),
    });
    let mut taps = guests.to_vec();
    taps.sort();
    taps.dedup();
    let from_guests = eq(json!({"meta": {"key": "iifname"}}), json!({"set": taps}));
    let drops = [
        (
            json!({"payload": {"protocol": "udp", "field": "sport"}}),
            json!(67),
            "DHCP server answers",
        ),
        (
            json!({"payload": {"protocol": "udp", "field": "sport"}}),
            json!(547),
            "DHCPv6 server answers",
        ),
        (
            json!({"payload": {"protocol": "icmpv6", "field": "type"}}),
            json!({"set": ["nd-router-advert", "nd-redirect"]}),
            "IPv6 router advertisements and redirects",
        ),
        (
            json!({"payload": {"protocol": "icmp", "field": "type"}}),
            json!("redirect"),
            "IPv4 ICMP redirects",
        ),
        // 802.1Q and 802.1ad: the bridge is not VLAN-aware, so a tagged frame
        // would reach every NIC of the network, and a guest that configured the
        // same VLAN would take its DHCP answers or router advertisements, which
        // the rules above (untagged headers only) never see.
        (
            json!({"payload": {"protocol": "ether", "field": "type"}}),
            json!({"set": [0x8100, 0x88a8]}),
            "VLAN-tagged frames",
        ),
    ];
    for (left, right, what) in drops {
        rules.push(Rule {
            family: "bridge",
            table: GUARD_TABLE,
            chain: "guests".into(),
            expr: json!([from_guests, eq(left, right), {"counter": null}, {"drop": null}]),
            what: format!("drop {what} from guests"),
        });
    }
}

fn desired(spec: &FirewallSpec) -> (Vec<Chain>, Vec<Rule>) {
    let mut chains = Vec::new();
    let mut rules = Vec::new();
    guard_desired(&spec.guests, &mut chains, &mut rules);
    if spec.nics.is_empty() {
        return (chains, rules);
    }
    chains.push(Chain {
        family: "bridge",
        table: TABLE,
        name: "mark".into(),
        hook: Some(("forward", -200, "accept")),
    });
    chains.push(Chain {
        family: "inet",
        table: TABLE,
        name: "zone".into(),
        hook: Some(("prerouting", -300, "accept")),
    });
    chains.push(Chain {
        family: "inet",
        table: TABLE,
        name: "fw".into(),
        hook: Some(("forward", 0, "accept")),
    });
    let mut zones = spec.zones.clone();
    zones.sort_by_key(|z| z.id);
    for z in &zones {
        let mut ports = z.ports.clone();
        ports.sort();
        for port in ports {
            rules.push(Rule {
                family: "inet",
                table: TABLE,
                chain: "zone".into(),
                expr: json!([
                    eq(json!({"meta": {"key": "iifname"}}), json!(port)),
                    {"mangle": {"key": {"ct": {"key": "zone"}}, "value": z.id}}
                ]),
                what: format!("zone {} for port {port}", z.id),
            });
        }
    }
    let mut nics = spec.nics.clone();
    nics.sort_by(|a, b| a.tap.cmp(&b.tap));
    for (i, nic) in nics.iter().enumerate() {
        let mark = MARK_BASE | (i as u32 + 1);
        let chain = nic_chain(&nic.tap);
        rules.push(Rule {
            family: "bridge",
            table: TABLE,
            chain: "mark".into(),
            expr: json!([
                eq(json!({"meta": {"key": "oifname"}}), json!(nic.tap)),
                {"mangle": {"key": {"meta": {"key": "mark"}}, "value": mark}}
            ]),
            what: format!("mark frames to {}", nic.tap),
        });
        rules.push(Rule {
            family: "inet",
            table: TABLE,
            chain: "fw".into(),
            expr: json!([
                eq(json!({"meta": {"key": "mark"}}), json!(mark)),
                {"jump": {"target": chain}}
            ]),
            what: format!("send {}'s traffic to {chain}", nic.tap),
        });
        chains.push(Chain {
            family: "inet",
            table: TABLE,
            name: chain.clone(),
            hook: None,
        });
        let mut push = |expr: Value, what: String| {
            rules.push(Rule {
                family: "inet",
                table: TABLE,
                chain: chain.clone(),
                expr,
                what: format!("{}: {what}", nic.tap),
            })
        };
        push(established(), "accept established, related".into());
        push(invalid_drop(), "drop invalid".into());
        // IPv6 neighbour discovery is not tracked (conntrack leaves it untracked):
        // without it no IPv6 exchange starts; router advertisements reach a guest
        // only from its gateway (the guest guard drops them from taps).
        push(
            json!([
                eq(
                    json!({"payload": {"protocol": "icmpv6", "field": "type"}}),
                    json!({"set": ["nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-advert"]}),
                ),
                {"accept": null}
            ]),
            "accept IPv6 neighbour discovery and router advertisements".into(),
        );
        if let Some(server) = nic.dhcp_server {
            push(
                json!([
                    eq(
                        json!({"payload": {"protocol": "ip", "field": "saddr"}}),
                        json!(server.to_string()),
                    ),
                    eq(json!({"meta": {"key": "l4proto"}}), json!("udp")),
                    eq(json!({"payload": {"protocol": "th", "field": "sport"}}), json!(67)),
                    eq(json!({"payload": {"protocol": "th", "field": "dport"}}), json!(68)),
                    {"accept": null}
                ]),
                format!("accept DHCP answers from {server}"),
            );
        }
        for r in &nic.rules {
            push(allow_expr(r, None), r.to_string());
        }
        push(counted_drop(), "drop the rest".into());
    }
    (chains, rules)
}

fn reverse_expr(rule: &AllowRule, nic: Ipv4Addr) -> Value {
    let mut e = vec![
        eq(
            json!({"payload": {"protocol": "ip", "field": "saddr"}}),
            json!(nic.to_string()),
        ),
        eq(
            json!({"payload": {"protocol": "ip", "field": "daddr"}}),
            prefix(rule.from),
        ),
    ];
    proto_and_ports(rule, "sport", &mut e);
    Value::Array(e)
}

/// What a tenant's router namespace enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterSpec {
    /// Guarded NICs' addresses with each of their allow rules.
    pub guarded: Vec<(Ipv4Addr, AllowRule)>,
    /// The tenant's network prefixes on this node (traffic between them is not
    /// tracked when there is egress).
    pub tenant_cidrs: Vec<Prefix>,
    /// Egress through the node, for external networks.
    pub egress: Option<Egress>,
}

/// Egress of a tenant's external networks through the router's uplink, masqueraded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Egress {
    /// The router side of the uplink.
    pub uplink: String,
    /// The external networks' prefixes.
    pub cidrs: Vec<Prefix>,
}

/// The router namespace's rules. They are stateless (`notrack`): with a gateway on
/// every node, a request is routed on the client's node and its reply on the
/// server's, so no router sees both directions. Each allow rule admits its
/// requests to the guarded NIC's address and the NIC's answers back; the stateful
/// check is the destination NIC's own chain on its node, which sees both.
fn router_desired(spec: &RouterSpec) -> (Vec<Chain>, Vec<Rule>) {
    let rules_in = &spec.guarded;
    let mut chains = vec![
        Chain {
            family: "inet",
            table: ROUTER_TABLE,
            name: "raw".into(),
            hook: Some(("prerouting", -300, "accept")),
        },
        Chain {
            family: "inet",
            table: ROUTER_TABLE,
            name: "fw".into(),
            hook: Some(("forward", 0, "drop")),
        },
    ];
    let mut rules = Vec::new();
    if spec.egress.is_none() {
        rules.push(Rule {
            family: "inet",
            table: ROUTER_TABLE,
            chain: "raw".into(),
            expr: json!([{"notrack": null}]),
            what: "no connection tracking (routing is asymmetric)".into(),
        });
    } else {
        // Egress is masqueraded, which needs conntrack: only traffic between the
        // tenant's own networks goes untracked.
        for p in &spec.tenant_cidrs {
            rules.push(Rule {
                family: "inet",
                table: ROUTER_TABLE,
                chain: "raw".into(),
                expr: json!([
                    eq(json!({"payload": {"protocol": "ip", "field": "daddr"}}), prefix(*p)),
                    {"notrack": null}
                ]),
                what: format!("no connection tracking to {p} (routing is asymmetric)"),
            });
        }
    }
    if let Some(egress) = &spec.egress {
        chains.push(Chain {
            family: "inet",
            table: ROUTER_TABLE,
            name: "uplink_nat".into(),
            hook: Some(("postrouting", 100, "accept")),
        });
        let oif = |op: &str| json!({"match": {"op": op, "left": {"meta": {"key": "oifname"}}, "right": egress.uplink}});
        let iif = json!({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": egress.uplink}});
        for p in &egress.cidrs {
            let from = eq(
                json!({"payload": {"protocol": "ip", "field": "saddr"}}),
                prefix(*p),
            );
            rules.push(Rule {
                family: "inet",
                table: ROUTER_TABLE,
                chain: "fw".into(),
                expr: json!([from.clone(), oif("=="), {"accept": null}]),
                what: format!("egress from external network {p}"),
            });
            rules.push(Rule {
                family: "inet",
                table: ROUTER_TABLE,
                chain: "uplink_nat".into(),
                expr: json!([from, oif("=="), {"masquerade": null}]),
                what: format!("masquerade {p} on the uplink"),
            });
        }
        rules.push(Rule {
            family: "inet",
            table: ROUTER_TABLE,
            chain: "fw".into(),
            expr: json!([
                iif,
                {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
                {"accept": null}
            ]),
            what: "answers to egress".into(),
        });
    }
    // Routing between a tenant's networks is IPv4 (its IPv6 is dropped there).
    for (daddr, r) in rules_in.iter().filter(|(_, r)| r.from.addr.is_ipv4()) {
        rules.push(Rule {
            family: "inet",
            table: ROUTER_TABLE,
            chain: "fw".into(),
            expr: allow_expr(r, Some(*daddr)),
            what: format!("to {daddr}: {r}"),
        });
        rules.push(Rule {
            family: "inet",
            table: ROUTER_TABLE,
            chain: "fw".into(),
            expr: reverse_expr(r, *daddr),
            what: format!("answers of {daddr}: {r}"),
        });
    }
    rules.push(Rule {
        family: "inet",
        table: ROUTER_TABLE,
        chain: "fw".into(),
        expr: counted_drop(),
        what: "drop the rest".into(),
    });
    (chains, rules)
}

fn transaction(tables: &[(&str, &str)], chains: &[Chain], rules: &[Rule]) -> Value {
    let mut cmds = Vec::new();
    for (family, table) in tables {
        // add-then-delete makes the delete succeed whether or not the table exists.
        cmds.push(json!({"add": {"table": {"family": family, "name": table}}}));
        cmds.push(json!({"delete": {"table": {"family": family, "name": table}}}));
    }
    let mut made = std::collections::BTreeSet::new();
    for c in chains {
        if made.insert((c.family, c.table)) {
            cmds.push(json!({"add": {"table": {"family": c.family, "name": c.table}}}));
        }
        let mut chain = json!({"family": c.family, "table": c.table, "name": c.name});
        if let Some((hook, prio, policy)) = c.hook {
            // The one NAT chain is named `uplink_nat`; every other base chain filters.
            chain["type"] = json!(if c.name == "uplink_nat" {
                "nat"
            } else {
                "filter"
            });
            chain["hook"] = json!(hook);
            chain["prio"] = json!(prio);
            chain["policy"] = json!(policy);
        }
        cmds.push(json!({"add": {"chain": chain}}));
    }
    for r in rules {
        cmds.push(json!({"add": {"rule": {
            "family": r.family, "table": r.table, "chain": r.chain,
            "comment": comment_for(&r.chain, &r.expr), "expr": r.expr,
        }}}));
    }
    json!({ "nftables": cmds })
}

fn nft(ns: &NetNs, args: &[&str], stdin: Option<String>) -> Result<String, NetworkError> {
    use std::io::Write;
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let shown = format!("nft {}", args.join(" "));
    let node = ns.node().to_owned();
    let out = ns
        .run(move || -> std::io::Result<std::process::Output> {
            let mut child = std::process::Command::new("nft")
                .args(&args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()?;
            if let Some(text) = stdin {
                child
                    .stdin
                    .take()
                    .expect("stdin is piped")
                    .write_all(text.as_bytes())?;
            }
            drop(child.stdin.take());
            child.wait_with_output()
        })
        .map_err(NetworkError::Netns)?
        .map_err(|e| NetworkError::Command {
            node: node.clone(),
            command: shown.clone(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetworkError::Command {
            node,
            command: shown,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// A base chain's hook, priority and policy as read back.
type Hook = Option<(String, i64, String)>;

/// A table as read back: per chain, its hook and its rules' comments in order.
#[derive(Debug, Default)]
struct ObservedTable {
    exists: bool,
    chains: std::collections::BTreeMap<String, (Hook, Vec<String>)>,
}

fn read_table(ns: &NetNs, family: &str, table: &str) -> Result<ObservedTable, NetworkError> {
    let text = match nft(ns, &["-j", "list", "table", family, table], None) {
        Ok(t) => t,
        Err(NetworkError::Command { detail, .. })
            if detail.contains("No such file or directory") =>
        {
            return Ok(ObservedTable::default());
        }
        Err(e) => return Err(e),
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| NetworkError::Command {
        node: ns.node().to_owned(),
        command: format!("nft -j list table {family} {table}"),
        detail: format!("unreadable JSON: {e}"),
    })?;
    let mut t = ObservedTable {
        exists: true,
        ..ObservedTable::default()
    };
    for item in v["nftables"].as_array().into_iter().flatten() {
        if let Some(c) = item.get("chain") {
            let name = c["name"].as_str().unwrap_or_default().to_owned();
            let hook = c["hook"].as_str().map(|h| {
                (
                    h.to_owned(),
                    c["prio"].as_i64().unwrap_or_default(),
                    c["policy"].as_str().unwrap_or_default().to_owned(),
                )
            });
            t.chains.entry(name).or_default().0 = hook;
        } else if let Some(r) = item.get("rule") {
            let chain = r["chain"].as_str().unwrap_or_default().to_owned();
            let comment = r["comment"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("handle {}", r["handle"]));
            t.chains.entry(chain).or_default().1.push(comment);
        }
    }
    Ok(t)
}

fn drift_of(
    ns: &NetNs,
    tables: &[(&str, &str)],
    chains: &[Chain],
    rules: &[Rule],
) -> Result<Vec<String>, NetworkError> {
    let mut drift = Vec::new();
    for (family, table) in tables {
        let have = read_table(ns, family, table)?;
        let want_chains: Vec<&Chain> = chains
            .iter()
            .filter(|c| c.family == *family && c.table == *table)
            .collect();
        if want_chains.is_empty() {
            if have.exists {
                let why = if *table == GUARD_TABLE {
                    "no guest NIC is here"
                } else {
                    "no NIC here has a security group"
                };
                drift.push(format!("table {family} {table} exists, but {why}"));
            }
            continue;
        }
        if !have.exists {
            drift.push(format!("table {family} {table} is missing"));
            continue;
        }
        for c in &want_chains {
            let Some((hook, have_rules)) = have.chains.get(&c.name) else {
                drift.push(format!("chain {family} {table} {} is missing", c.name));
                continue;
            };
            let want_hook = c
                .hook
                .map(|(h, p, pol)| (h.to_owned(), i64::from(p), pol.to_owned()));
            if *hook != want_hook {
                drift.push(format!(
                    "chain {family} {table} {}: hook {hook:?}, want {want_hook:?}",
                    c.name
                ));
            }
            let want: Vec<(String, &Rule)> = rules
                .iter()
                .filter(|r| r.family == *family && r.table == *table && r.chain == c.name)
                .map(|r| (comment_for(&r.chain, &r.expr), r))
                .collect();
            for (comment, r) in &want {
                if !have_rules.contains(comment) {
                    drift.push(format!(
                        "chain {family} {table} {}: rule missing: {}",
                        c.name, r.what
                    ));
                }
            }
            for comment in have_rules {
                if !want.iter().any(|(w, _)| w == comment) {
                    drift.push(format!(
                        "chain {family} {table} {}: a rule cairn did not make ({comment})",
                        c.name
                    ));
                }
            }
            let order: Vec<&String> = have_rules
                .iter()
                .filter(|h| want.iter().any(|(w, _)| w == *h))
                .collect();
            let want_order: Vec<&String> = want
                .iter()
                .map(|(w, _)| w)
                .filter(|w| have_rules.contains(w))
                .collect();
            if order != want_order {
                drift.push(format!(
                    "chain {family} {table} {}: rules out of order",
                    c.name
                ));
            }
        }
        for name in have.chains.keys() {
            if !want_chains.iter().any(|c| &c.name == name) {
                drift.push(format!("chain {family} {table} {name} is not cairn's"));
            }
        }
    }
    Ok(drift)
}

const NODE_TABLES: [(&str, &str); 3] =
    [("bridge", TABLE), ("inet", TABLE), ("bridge", GUARD_TABLE)];

/// The br_netfilter switches that pass bridged IPv4 and IPv6 to the inet hooks
/// (per namespace): with either at 0 that family bypasses the groups.
const BRIDGE_NF_CALLS: [&str; 2] = ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"];

fn bridge_nf_call(ns: &NetNs, name: &'static str) -> Result<Option<bool>, NetworkError> {
    let v = ns
        .run(move || std::fs::read_to_string(format!("/proc/sys/net/bridge/{name}")))
        .map_err(NetworkError::Netns)?;
    Ok(v.ok().map(|t| t.trim() == "1"))
}

/// Reads the node's security-group tables back and lists every difference
/// from `spec` (empty: converged).
pub fn firewall_drift(ns: &NetNs, spec: &FirewallSpec) -> Result<Vec<String>, NetworkError> {
    let (chains, rules) = desired(spec);
    let mut drift = drift_of(ns, &NODE_TABLES, &chains, &rules)?;
    for name in BRIDGE_NF_CALLS {
        if !spec.nics.is_empty() && bridge_nf_call(ns, name)? == Some(false) {
            let family = if name.ends_with("ip6tables") {
                "IPv6"
            } else {
                "IPv4"
            };
            drift.push(format!(
                "net.bridge.{name} is 0: bridged {family} traffic bypasses the groups"
            ));
        }
    }
    Ok(drift)
}

/// Converges the node's security groups: when [`firewall_drift`] finds any
/// difference, both tables are replaced in one `nft` transaction (a packet sees
/// the old rules or the new, never none). Returns the drift that was repaired.
pub fn apply_firewall(ns: &NetNs, spec: &FirewallSpec) -> Result<Vec<String>, NetworkError> {
    for name in BRIDGE_NF_CALLS.iter().filter(|_| !spec.nics.is_empty()) {
        match bridge_nf_call(ns, name)? {
            None => {
                return Err(NetworkError::Command {
                    node: ns.node().to_owned(),
                    command: format!("read net.bridge.{name}"),
                    detail: "br_netfilter is not available: stateful security groups on bridged taps need it (or bridge conntrack)".into(),
                });
            }
            Some(false) => {
                let node = ns.node().to_owned();
                ns.run(move || std::fs::write(format!("/proc/sys/net/bridge/{name}"), "1"))
                    .map_err(NetworkError::Netns)?
                    .map_err(|e| NetworkError::Command {
                        node,
                        command: format!("sysctl net.bridge.{name}=1"),
                        detail: e.to_string(),
                    })?;
            }
            Some(true) => {}
        }
    }
    let drift = firewall_drift(ns, spec)?;
    if drift.is_empty() {
        return Ok(drift);
    }
    let (chains, rules) = desired(spec);
    // Nothing guarded: the transaction only removes both tables.
    let tx = transaction(&NODE_TABLES, &chains, &rules);
    nft(ns, &["-j", "-f", "-"], Some(tx.to_string()))?;
    Ok(drift)
}

/// Reads a tenant router namespace's forwarding table back and lists drift.
pub fn router_firewall_drift(
    router: &NetNs,
    rules: &[(Ipv4Addr, AllowRule)],
) -> Result<Vec<String>, NetworkError> {
    router_drift(
        router,
        &RouterSpec {
            guarded: rules.to_vec(),
            ..RouterSpec::default()
        },
    )
}

/// Reads a tenant router namespace's tables back and lists drift from `spec`.
pub fn router_drift(router: &NetNs, spec: &RouterSpec) -> Result<Vec<String>, NetworkError> {
    let (chains, r) = router_desired(spec);
    drift_of(router, &[("inet", ROUTER_TABLE)], &chains, &r)
}

/// Converges a tenant router namespace's forwarding rules: routed traffic
/// between the tenant's networks is dropped unless an allow rule admits it to
/// the address `(daddr, rule)` of a guarded NIC, or it is that NIC's answer.
pub fn apply_router_firewall(
    router: &NetNs,
    rules: &[(Ipv4Addr, AllowRule)],
) -> Result<Vec<String>, NetworkError> {
    apply_router(
        router,
        &RouterSpec {
            guarded: rules.to_vec(),
            ..RouterSpec::default()
        },
    )
}

/// Converges a tenant router namespace's tables to `spec` (forwarding between the
/// tenant's networks as [`apply_router_firewall`], plus egress when given).
pub fn apply_router(router: &NetNs, spec: &RouterSpec) -> Result<Vec<String>, NetworkError> {
    let drift = router_drift(router, spec)?;
    if drift.is_empty() {
        return Ok(drift);
    }
    let (chains, r) = router_desired(spec);
    let tx = transaction(&[("inet", ROUTER_TABLE)], &chains, &r);
    nft(router, &["-j", "-f", "-"], Some(tx.to_string()))?;
    Ok(drift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(proto: Proto, ports: Option<(u16, u16)>) -> AllowRule {
        AllowRule {
            group: "db".into(),
            from: Prefix::parse("10.20.0.0/24").unwrap(),
            to: None,
            proto,
            ports,
        }
    }

    #[test]
    fn rules_render_to_nft_json() {
        let e = allow_expr(&rule(Proto::Tcp, Some((5432, 5432))), None).to_string();
        assert!(
            e.contains(r#""right":{"prefix":{"addr":"10.20.0.0","len":24}}"#),
            "{e}"
        );
        assert!(
            e.contains(r#""right":"tcp""#) && e.contains(r#""right":5432"#),
            "{e}"
        );
        let e = allow_expr(&rule(Proto::Udp, Some((8000, 8100))), None).to_string();
        assert!(e.contains(r#"{"range":[8000,8100]}"#), "{e}");
        let e = allow_expr(&rule(Proto::Icmp, Some((1, 2))), None).to_string();
        assert!(!e.contains("dport"), "ICMP has no ports: {e}");
        let e = allow_expr(&rule(Proto::Any, None), None).to_string();
        assert!(!e.contains("l4proto"), "{e}");
        assert_eq!(
            rule(Proto::Tcp, Some((5432, 5432))).to_string(),
            "db: allow tcp 5432 from 10.20.0.0/24"
        );
    }

    #[test]
    fn comments_follow_the_rule_and_marks_are_distinct() {
        let a = allow_expr(&rule(Proto::Tcp, Some((5432, 5432))), None);
        let b = allow_expr(&rule(Proto::Tcp, Some((5433, 5433))), None);
        assert_ne!(comment_for("nic_x", &a), comment_for("nic_x", &b));
        assert_ne!(comment_for("nic_x", &a), comment_for("nic_y", &a));
        let spec = FirewallSpec {
            nics: vec![
                GuardedNic {
                    tap: "ctb".into(),
                    ipv4: None,
                    rules: vec![],
                    dhcp_server: None,
                },
                GuardedNic {
                    tap: "cta".into(),
                    ipv4: None,
                    rules: vec![],
                    dhcp_server: None,
                },
            ],
            zones: vec![],
            guests: vec![],
        };
        let (chains, rules) = desired(&spec);
        assert_eq!(chains.len(), 5);
        let marks: Vec<String> = rules
            .iter()
            .filter(|r| r.chain == "mark")
            .map(|r| r.expr.to_string())
            .collect();
        assert_eq!(marks.len(), 2);
        assert!(marks[0].contains("cta") && marks[1].contains("ctb"));
        assert_ne!(marks[0], marks[1]);
        assert!(desired(&FirewallSpec::default()).0.is_empty());
    }

    #[test]
    fn the_guest_guard_covers_every_guest_tap_without_groups() {
        let spec = FirewallSpec {
            guests: vec!["ctb".into(), "cta".into(), "cta".into()],
            ..FirewallSpec::default()
        };
        let (chains, rules) = desired(&spec);
        assert_eq!(chains.len(), 1, "only the guard: no NIC has a group");
        assert_eq!((chains[0].table, chains[0].family), (GUARD_TABLE, "bridge"));
        assert_eq!(chains[0].hook, Some(("prerouting", -300, "accept")));
        assert_eq!(rules.len(), 5);
        for r in &rules {
            let e = r.expr.to_string();
            assert!(e.contains(r#"{"set":["cta","ctb"]}"#), "{e}");
            assert!(e.ends_with(r#"{"counter":null},{"drop":null}]"#), "{e}");
        }
        assert!(rules[0].expr.to_string().contains(r#""right":67}"#));
        assert!(rules[1].expr.to_string().contains(r#""right":547"#));
        assert!(rules[2].expr.to_string().contains("nd-router-advert"));
        assert!(rules[3].expr.to_string().contains(r#""right":"redirect""#));
        assert!(rules[4].expr.to_string().contains("[33024,34984]"));
    }

    #[test]
    fn prefixes_parse() {
        assert_eq!(
            Prefix::parse("10.0.0.5").map(|p| p.len),
            Some(32),
            "bare address"
        );
        assert!(Prefix::parse("10.0.0.0/33").is_none());
        assert!(Prefix::parse("x/8").is_none());
        let v6 = Prefix::parse("fd00:20::/64").unwrap();
        assert_eq!((v6.len, v6.family()), (64, "ip6"));
        assert_eq!(Prefix::parse("fd00::5").map(|p| p.len), Some(128));
        assert!(Prefix::parse("fd00::/129").is_none());
        let rule = AllowRule {
            from: v6,
            ..rule(Proto::Tcp, Some((5432, 5432)))
        };
        let e = allow_expr(&rule, None).to_string();
        assert!(
            e.contains(r#""protocol":"ip6""#)
                && e.contains(r#"{"prefix":{"addr":"fd00:20::","len":64}}"#),
            "{e}"
        );
        assert_eq!(rule.to_string(), "db: allow tcp 5432 from fd00:20::/64");
        let (_, routed) = router_desired(&RouterSpec {
            guarded: vec![(Ipv4Addr::new(10, 20, 0, 5), rule)],
            ..RouterSpec::default()
        });
        assert!(
            routed.iter().all(|r| !r.expr.to_string().contains("ip6")),
            "routing between networks is IPv4: an IPv6 rule adds nothing there"
        );
        assert_eq!(Proto::parse("any"), Some(Proto::Any));
        assert_eq!(Proto::parse("sctp"), None);
    }
}
