//! Desired state of a bond: the serde types the node agent receives.

use serde::{Deserialize, Serialize};

/// Bond mode, as written in SPEC.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BondMode {
    /// One member carries traffic; another takes over when it fails.
    #[serde(rename = "active-backup")]
    ActiveBackup,
    /// Packets are sent round-robin over all members.
    #[serde(rename = "balance-rr")]
    BalanceRr,
    /// Flows are hashed onto members.
    #[serde(rename = "balance-xor")]
    BalanceXor,
    /// IEEE 802.3ad link aggregation (LACP).
    #[serde(rename = "802.3ad")]
    Lacp,
}

impl BondMode {
    /// The spelling used in the spec and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            BondMode::ActiveBackup => "active-backup",
            BondMode::BalanceRr => "balance-rr",
            BondMode::BalanceXor => "balance-xor",
            BondMode::Lacp => "802.3ad",
        }
    }

    /// The kernel's `IFLA_BOND_MODE` number.
    pub fn kernel_mode(self) -> u8 {
        match self {
            BondMode::BalanceRr => 0,
            BondMode::ActiveBackup => 1,
            BondMode::BalanceXor => 2,
            BondMode::Lacp => 4,
        }
    }

    /// The mode for a kernel `IFLA_BOND_MODE` number.
    pub fn from_kernel_mode(mode: u8) -> Option<Self> {
        [
            BondMode::BalanceRr,
            BondMode::ActiveBackup,
            BondMode::BalanceXor,
            BondMode::Lacp,
        ]
        .into_iter()
        .find(|m| m.kernel_mode() == mode)
    }
}

impl std::str::FromStr for BondMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            BondMode::ActiveBackup,
            BondMode::BalanceRr,
            BondMode::BalanceXor,
            BondMode::Lacp,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
        .ok_or_else(|| {
            format!("`{s}` is not a bond mode (active-backup, balance-rr, balance-xor, 802.3ad)")
        })
    }
}

impl std::fmt::Display for BondMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Traffic types known to the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrafficKind {
    /// Block storage (NBD, replication of writes in the data path).
    Storage,
    /// Live migration streams.
    Migration,
    /// VM guest traffic; also the class of unmarked traffic.
    Guest,
    /// Node management (agent gRPC, ssh).
    Management,
    /// Background replication (protection plans).
    Replication,
}

impl TrafficKind {
    /// All kinds in class-id order.
    pub const ALL: [TrafficKind; 5] = [
        TrafficKind::Storage,
        TrafficKind::Migration,
        TrafficKind::Guest,
        TrafficKind::Management,
        TrafficKind::Replication,
    ];

    /// The spec spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficKind::Storage => "storage",
            TrafficKind::Migration => "migration",
            TrafficKind::Guest => "guest",
            TrafficKind::Management => "management",
            TrafficKind::Replication => "replication",
        }
    }

    /// The DSCP code point senders of this traffic type mark their packets
    /// with; `None` for guest traffic, which is the unmarked catch-all.
    ///
    /// storage = AF41 (34), migration = AF21 (18), management = CS2 (16),
    /// replication = AF11 (10), guest = best effort (0, unmarked).
    pub fn dscp(self) -> Option<u8> {
        match self {
            TrafficKind::Storage => Some(34),
            TrafficKind::Migration => Some(18),
            TrafficKind::Guest => None,
            TrafficKind::Management => Some(16),
            TrafficKind::Replication => Some(10),
        }
    }

    /// The IPv4 TOS / IPv6 traffic-class byte for [`Self::dscp`] (DSCP << 2).
    pub fn tos(self) -> Option<u8> {
        self.dscp().map(|d| d << 2)
    }

    /// The HTB minor class id of this kind (`1:<minor>`, hex).
    pub fn class_minor(self) -> u16 {
        match self {
            TrafficKind::Storage => 0x10,
            TrafficKind::Migration => 0x20,
            TrafficKind::Guest => 0x30,
            TrafficKind::Management => 0x40,
            TrafficKind::Replication => 0x50,
        }
    }

    /// The kind of an HTB minor class id.
    pub fn from_class_minor(minor: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_minor() == minor)
    }
}

impl std::str::FromStr for TrafficKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            format!("`{s}` is not a traffic class (storage, migration, guest, management, replication)")
        })
    }
}

impl std::fmt::Display for TrafficKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One traffic class of a bond.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficClassSpec {
    /// The traffic type.
    pub name: TrafficKind,
    /// Guaranteed rate in bits per second (HTB `rate`).
    pub min_bps: u64,
    /// Ceiling in bits per second (HTB `ceil`); `None` means the bond's capacity.
    #[serde(default)]
    pub max_bps: Option<u64>,
    /// Share of the excess bandwidth relative to the other classes (HTB
    /// `quantum` = weight × [`crate::qos::QUANTUM_PER_WEIGHT`]), 1..=100.
    pub weight: u32,
}

/// MTU used when a spec leaves it out.
pub const DEFAULT_MTU: u32 = 1500;
/// miimon used when a spec leaves it out (the bonding driver's usual 100 ms).
pub const DEFAULT_MIIMON_MS: u32 = 100;

fn default_mtu() -> u32 {
    DEFAULT_MTU
}

fn default_miimon() -> u32 {
    DEFAULT_MIIMON_MS
}

/// Desired state of one bond on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BondSpec {
    /// Device name (at most 15 characters).
    pub name: String,
    /// Bond mode.
    pub mode: BondMode,
    /// Member NIC names on the node.
    pub members: Vec<String>,
    /// MTU of the bond and its members ([`DEFAULT_MTU`] when omitted).
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Link monitoring interval in milliseconds (bond `miimon`; the fallback's
    /// poll interval besides link events; [`DEFAULT_MIIMON_MS`] when omitted).
    #[serde(default = "default_miimon")]
    pub miimon: u32,
    /// Traffic classes.
    pub classes: Vec<TrafficClassSpec>,
    /// Bond capacity in bits per second. `None`: read the members' link
    /// speed (one member's for active-backup, the sum otherwise).
    #[serde(default)]
    pub capacity_bps: Option<u64>,
}

impl BondSpec {
    /// The class of a kind, if the spec has one.
    pub fn class(&self, kind: TrafficKind) -> Option<&TrafficClassSpec> {
        self.classes.iter().find(|c| c.name == kind)
    }

    /// Where unmarked traffic goes: guest if present, else management, else
    /// the first class. `None` when the spec has no classes.
    pub fn default_class(&self) -> Option<TrafficKind> {
        [TrafficKind::Guest, TrafficKind::Management]
            .into_iter()
            .find(|k| self.class(*k).is_some())
            .or_else(|| self.classes.first().map(|c| c.name))
    }
}

/// A spec error found before touching the node (node and bond named).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node `{node}`, bond `{bond}`: {problem}")]
pub struct SpecError {
    /// Node name.
    pub node: String,
    /// Bond name.
    pub bond: String,
    /// What is wrong.
    pub problem: String,
}

/// Checks a spec on its own (no I/O): name, members, MTU, classes.
/// Capacity checks need the node and happen in [`crate::apply_bond`].
pub fn validate_spec(node: &str, spec: &BondSpec) -> Result<(), SpecError> {
    let err = |problem: String| SpecError {
        node: node.to_owned(),
        bond: spec.name.clone(),
        problem,
    };
    if !valid_ifname(&spec.name) {
        return Err(err(format!(
            "device name `{}` is not a valid interface name (1-15 characters, no `/`, `:` or whitespace)",
            spec.name
        )));
    }
    if spec.members.is_empty() {
        return Err(err("a bond needs at least one member NIC".to_owned()));
    }
    for (i, m) in spec.members.iter().enumerate() {
        if !valid_ifname(m) {
            return Err(err(format!("member `{m}` is not a valid interface name")));
        }
        if spec.members[..i].contains(m) {
            return Err(err(format!("member `{m}` is listed twice")));
        }
        if *m == spec.name {
            return Err(err(format!("member `{m}` has the bond's own name")));
        }
    }
    if !(68..=65535).contains(&spec.mtu) {
        return Err(err(format!("mtu {} is outside 68..=65535", spec.mtu)));
    }
    if spec.miimon == 0 {
        return Err(err(
            "miimon must be at least 1 ms (0 disables link monitoring)".to_owned(),
        ));
    }
    for (i, c) in spec.classes.iter().enumerate() {
        if spec.classes[..i].iter().any(|o| o.name == c.name) {
            return Err(err(format!("traffic class `{}` is listed twice", c.name)));
        }
        if c.min_bps < 8 {
            return Err(err(format!(
                "traffic class `{}` needs a min of at least 8bps",
                c.name
            )));
        }
        if let Some(max) = c.max_bps
            && max < c.min_bps
        {
            return Err(err(format!(
                "traffic class `{}` has max {} below its min {}",
                c.name,
                crate::qos::fmt_bps(max),
                crate::qos::fmt_bps(c.min_bps)
            )));
        }
        if !(1..=100).contains(&c.weight) {
            return Err(err(format!(
                "traffic class `{}` has weight {}; use 1..=100",
                c.name, c.weight
            )));
        }
    }
    Ok(())
}

/// Checks the rates against the bond's capacity.
pub fn validate_capacity(node: &str, spec: &BondSpec, capacity_bps: u64) -> Result<(), SpecError> {
    let err = |problem: String| SpecError {
        node: node.to_owned(),
        bond: spec.name.clone(),
        problem,
    };
    let sum: u64 = spec.classes.iter().map(|c| c.min_bps).sum();
    if sum > capacity_bps {
        return Err(err(format!(
            "the traffic classes' minimums add up to {}, above the bond's capacity of {} ({} of {} NIC(s) {})",
            crate::qos::fmt_bps(sum),
            crate::qos::fmt_bps(capacity_bps),
            if spec.mode == BondMode::ActiveBackup {
                "one member's speed"
            } else {
                "the sum of the speeds"
            },
            spec.members.len(),
            spec.members.join(", "),
        )));
    }
    for c in &spec.classes {
        if let Some(max) = c.max_bps
            && max > capacity_bps
        {
            return Err(err(format!(
                "traffic class `{}` has max {} above the bond's capacity of {}",
                c.name,
                crate::qos::fmt_bps(max),
                crate::qos::fmt_bps(capacity_bps)
            )));
        }
    }
    Ok(())
}

/// Whether `name` is a valid Linux interface name.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BondSpec {
        serde_json::from_str(
            r#"{"name":"data","mode":"802.3ad","members":["ens1f0","ens1f1"],"mtu":9000,"miimon":100,
                "classes":[{"name":"storage","min_bps":10000000000,"weight":4},
                           {"name":"migration","min_bps":5000000000,"max_bps":20000000000,"weight":1}]}"#,
        )
        .expect("spec json")
    }

    #[test]
    fn spec_json_uses_spec_spellings() {
        let s = spec();
        assert_eq!(s.mode, BondMode::Lacp);
        assert_eq!(s.classes[1].max_bps, Some(20_000_000_000));
        assert_eq!(s.capacity_bps, None);
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains("\"802.3ad\"") && json.contains("\"migration\""),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<BondSpec>(&json).unwrap(), s);
    }

    #[test]
    fn defaults_and_parsing_for_the_wire() {
        let s: BondSpec = serde_json::from_str(
            r#"{"name":"b","mode":"active-backup","members":["a"],"classes":[]}"#,
        )
        .unwrap();
        assert_eq!((s.mtu, s.miimon), (DEFAULT_MTU, DEFAULT_MIIMON_MS));
        assert_eq!("802.3ad".parse::<BondMode>(), Ok(BondMode::Lacp));
        assert!("lacp".parse::<BondMode>().unwrap_err().contains("802.3ad"));
        assert_eq!(
            "replication".parse::<TrafficKind>(),
            Ok(TrafficKind::Replication)
        );
        assert!("bulk".parse::<TrafficKind>().is_err());
    }

    #[test]
    fn validation_names_node_and_bond() {
        let check = |f: &dyn Fn(&mut BondSpec), needle: &str| {
            let mut s = spec();
            f(&mut s);
            let e = validate_spec("hq-n1", &s).expect_err(needle).to_string();
            assert!(
                e.starts_with("node `hq-n1`, bond `data`") || e.contains("hq-n1"),
                "{e}"
            );
            assert!(e.contains(needle), "{e} lacks {needle}");
        };
        assert!(validate_spec("hq-n1", &spec()).is_ok());
        check(
            &|s| s.name = "a-very-long-bond-name".into(),
            "not a valid interface name",
        );
        check(&|s| s.members.clear(), "at least one member");
        check(&|s| s.members[1] = "ens1f0".into(), "listed twice");
        check(&|s| s.mtu = 10, "mtu");
        check(&|s| s.classes[1].max_bps = Some(1), "below its min");
        check(&|s| s.classes[0].weight = 0, "weight 0");
        check(
            &|s| s.classes[1].name = TrafficKind::Storage,
            "listed twice",
        );
    }

    #[test]
    fn capacity_check_sums_minimums() {
        let s = spec();
        assert!(validate_capacity("n", &s, 20_000_000_000).is_ok());
        let e = validate_capacity("n", &s, 10_000_000_000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("15Gbit/s") && e.contains("10Gbit/s"), "{e}");
        let e = validate_capacity("n", &s, 16_000_000_000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("migration") && e.contains("max 20Gbit/s"), "{e}");
    }

    #[test]
    fn default_class_prefers_guest_then_management() {
        let mut s = spec();
        assert_eq!(s.default_class(), Some(TrafficKind::Storage));
        s.classes.push(TrafficClassSpec {
            name: TrafficKind::Management,
            min_bps: 8,
            max_bps: None,
            weight: 1,
        });
        assert_eq!(s.default_class(), Some(TrafficKind::Management));
        s.classes.push(TrafficClassSpec {
            name: TrafficKind::Guest,
            min_bps: 8,
            max_bps: None,
            weight: 1,
        });
        assert_eq!(s.default_class(), Some(TrafficKind::Guest));
    }
}
