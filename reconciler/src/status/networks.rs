//! `cairn status`'s tenant networks (issue 19): every VM NIC with its address, VNI and
//! security groups, and every segment per node with its VTEP, MTU, forwarding entries
//! and drift (the same differences the plan repairs, `plan::segment_diff`).

use std::fmt::Write as _;

use serde::Serialize;

use crate::desired::Desired;
use crate::observe::{NodeObservation, Observed};

/// A VM NIC on a tenant network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct NicRow {
    /// VM.
    pub vm: String,
    /// Index of the NIC in the VM's definition.
    pub nic: u32,
    /// Tenant.
    pub tenant: String,
    /// Network.
    pub network: String,
    /// IPAM address (empty: none, e.g. an IPv6 network).
    pub address: String,
    /// The network's VXLAN network identifier.
    pub vni: u32,
    /// Security groups the NIC lists.
    pub security_groups: Vec<String>,
    /// The node the VM is placed on.
    pub node: String,
    /// The drift of its network's segment on that node (`none`, `missing`,
    /// `definition`, `security-groups`, `refused`, `no-underlay`, `unknown`).
    pub drift: String,
}

/// A tenant network's segment on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct SegmentRow {
    /// `tenant/network`.
    pub segment: String,
    /// Node.
    pub node: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Local VTEP (the wanted one; the node's when not in the spec).
    pub vtep: String,
    /// MTU read back (0: not made).
    pub mtu: u32,
    /// Forwarding entries wanted (one per NIC of the network on another node).
    pub entries_wanted: usize,
    /// Forwarding entries read back.
    pub entries: usize,
    /// `none`; `missing` (not made); `definition` (something differs: the details);
    /// `security-groups` (the node's group tables differ); `not-in-spec`; `refused`
    /// (the node cannot make networks); `no-underlay` (a node running its network in
    /// a namespace without `underlay=`); `unknown` (its node did not answer).
    pub drift: String,
    /// What differs, one line each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detail: Vec<String>,
}

/// Every NIC and segment row.
pub fn rows(desired: &Desired, observed: &Observed) -> (Vec<NicRow>, Vec<SegmentRow>) {
    let mut segments = vec![];
    for node in desired.segments.keys().chain(
        observed
            .nodes
            .keys()
            .filter(|n| !desired.segments.contains_key(*n)),
    ) {
        let empty = Default::default();
        let wanted = desired.segments.get(node).unwrap_or(&empty);
        let networking = match observed.nodes.get(node) {
            Some(NodeObservation::Reachable { networking, .. }) => Some(networking),
            _ => None,
        };
        for want in wanted.values() {
            let have = networking.and_then(|n| n.segments.get(&want.key()));
            let (drift, detail) = match networking {
                None => ("unknown", vec!["its node did not answer".to_owned()]),
                Some(n) if !n.unavailable.is_empty() => (
                    "refused",
                    vec![format!(
                        "network actions are refused there: {}",
                        n.unavailable
                    )],
                ),
                Some(n) if !n.netns.is_empty() && want.underlay_prefix_len == 0 => (
                    "no-underlay",
                    vec![format!(
                        "the node runs its network in namespace {} and the spec gives it no `underlay=`",
                        n.netns
                    )],
                ),
                Some(n) => match have {
                    None => ("missing", vec![]),
                    Some(have) => {
                        let diff = crate::plan::segment_diff(want, have);
                        if !diff.is_empty() {
                            ("definition", diff)
                        } else if !n.firewall_drift.is_empty() && !want.guarded.is_empty() {
                            (
                                "security-groups",
                                n.firewall_drift
                                    .iter()
                                    .map(|d| format!("security groups: {d}"))
                                    .collect(),
                            )
                        } else {
                            ("none", vec![])
                        }
                    }
                },
            };
            segments.push(SegmentRow {
                segment: want.key(),
                node: node.clone(),
                vni: want.vni,
                vtep: want.local_vtep.clone(),
                mtu: have.map_or(0, |h| h.mtu),
                entries_wanted: want.remotes.len(),
                entries: have.map_or(0, |h| h.fdb.len()),
                drift: drift.to_owned(),
                detail,
            });
        }
        for (key, have) in networking
            .into_iter()
            .flat_map(|n| n.segments.iter())
            .filter(|(k, _)| !wanted.contains_key(*k))
        {
            segments.push(SegmentRow {
                segment: key.clone(),
                node: node.clone(),
                vni: have.vni,
                vtep: have.local_vtep.clone(),
                mtu: have.mtu,
                entries_wanted: 0,
                entries: have.fdb.len(),
                drift: "not-in-spec".to_owned(),
                detail: vec!["no VM of its tenant is placed on this node any more".to_owned()],
            });
        }
    }
    segments.sort_by(|a, b| (&a.segment, &a.node).cmp(&(&b.segment, &b.node)));
    let mut nics = vec![];
    for vm in desired.vms.values() {
        for (i, network) in vm.nics.iter().enumerate() {
            let key = crate::segments::segment_key(&vm.tenant, network);
            let segment = desired.segments.get(&vm.node).and_then(|s| s.get(&key));
            let groups = segment
                .and_then(|s| {
                    s.guarded
                        .iter()
                        .find(|g| g.vm == vm.name && g.nic as usize == i)
                })
                .map(|g| g.groups.clone())
                .unwrap_or_default();
            let drift = segments
                .iter()
                .find(|r| r.segment == key && r.node == vm.node)
                .map_or("missing", |r| {
                    // The node's group tables matter only to NICs that list groups.
                    if r.drift == "security-groups" && groups.is_empty() {
                        "none"
                    } else {
                        r.drift.as_str()
                    }
                });
            nics.push(NicRow {
                vm: vm.name.clone(),
                nic: i as u32,
                tenant: vm.tenant.clone(),
                network: network.clone(),
                address: desired
                    .placement
                    .nic_address(&vm.name, i)
                    .unwrap_or_default()
                    .to_owned(),
                vni: desired
                    .placement
                    .network(&vm.tenant, network)
                    .map_or(0, |n| n.vni),
                security_groups: groups,
                node: vm.node.clone(),
                drift: if segment.is_none() && drift == "missing" {
                    // IPv6 networks and nodes without a VTEP have no segment.
                    "no-segment".to_owned()
                } else {
                    drift.to_owned()
                },
            });
        }
    }
    (nics, segments)
}

/// The `networks:` and `segments:` sections (nothing when there are none).
pub fn text(nics: &[NicRow], segments: &[SegmentRow]) -> String {
    let mut out = String::new();
    if !nics.is_empty() {
        out.push_str("\nnetworks:\n");
        let mut rows = vec![vec![
            "VM".into(),
            "NIC".into(),
            "TENANT".into(),
            "NETWORK".into(),
            "ADDRESS".into(),
            "VNI".into(),
            "GROUPS".into(),
            "NODE".into(),
            "DRIFT".into(),
        ]];
        for n in nics {
            rows.push(vec![
                n.vm.clone(),
                n.nic.to_string(),
                n.tenant.clone(),
                n.network.clone(),
                if n.address.is_empty() {
                    "-".into()
                } else {
                    n.address.clone()
                },
                n.vni.to_string(),
                if n.security_groups.is_empty() {
                    "-".into()
                } else {
                    n.security_groups.join(",")
                },
                n.node.clone(),
                n.drift.clone(),
            ]);
        }
        out.push_str(&super::table(&rows));
    }
    if !segments.is_empty() {
        out.push_str("\nsegments:\n");
        let mut rows = vec![vec![
            "SEGMENT".into(),
            "NODE".into(),
            "VNI".into(),
            "VTEP".into(),
            "MTU".into(),
            "ENTRIES".into(),
            "DRIFT".into(),
        ]];
        for s in segments {
            rows.push(vec![
                s.segment.clone(),
                s.node.clone(),
                s.vni.to_string(),
                s.vtep.clone(),
                if s.mtu == 0 {
                    "-".into()
                } else {
                    s.mtu.to_string()
                },
                format!("{}/{}", s.entries, s.entries_wanted),
                s.drift.clone(),
            ]);
        }
        out.push_str(&super::table(&rows));
        for s in segments.iter().filter(|s| s.drift != "none") {
            for d in &s.detail {
                let _ = writeln!(out, "  ! segment {} on {}: {d}", s.segment, s.node);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nics_show_address_vni_and_groups_and_segments_their_drift() {
        let desired = crate::plan::quickstart_desired(None);
        let mut observed = crate::plan::segments_converged(&desired);
        let (nics, segments) = rows(&desired, &observed);
        let db = nics.iter().find(|n| n.vm == "db").unwrap();
        assert_eq!(
            Some(db.address.as_str()),
            desired.placement.nic_address("db", 0)
        );
        assert_eq!(
            db.vni,
            desired.placement.network("dev", "dev-net").unwrap().vni
        );
        assert_eq!(db.drift, "none");
        assert!(nics.iter().all(|n| n.drift == "none"), "{nics:?}");
        assert_eq!(segments.len(), 4, "dev-net on 3 nodes, ops-net on 1");
        assert!(segments.iter().all(|s| s.drift == "none"), "{segments:?}");
        let shown = text(&nics, &segments);
        assert!(
            shown.contains("networks:") && shown.contains("segments:"),
            "{shown}"
        );
        assert!(shown.contains(&db.address), "{shown}");
        // An entry gone on db's node: that segment and db's NIC show it.
        let Some(NodeObservation::Reachable { networking, .. }) = observed.nodes.get_mut(&db.node)
        else {
            panic!()
        };
        let have = networking.segments.get_mut("dev/dev-net").unwrap();
        let gone = have.fdb.pop().unwrap();
        networking.firewall_drift = vec!["chain nic_ct1: rule cairn:ab missing".into()];
        let (nics, segments) = rows(&desired, &observed);
        let row = segments
            .iter()
            .find(|s| s.node == db.node && s.segment == "dev/dev-net")
            .unwrap();
        assert_eq!(row.drift, "definition");
        assert_eq!(row.detail, vec![format!("+ fdb {gone}")]);
        assert_eq!(row.entries + 1, row.entries_wanted);
        assert_eq!(
            nics.iter().find(|n| n.vm == "db").unwrap().drift,
            "definition"
        );
        let shown = text(&nics, &segments);
        assert!(
            shown.contains(&format!(
                "! segment dev/dev-net on {}: + fdb {gone}",
                db.node
            )),
            "{shown}"
        );
        // Not made at all: missing.
        let Some(NodeObservation::Reachable { networking, .. }) = observed.nodes.get_mut(&db.node)
        else {
            panic!()
        };
        networking.segments.clear();
        let (_, segments) = rows(&desired, &observed);
        assert!(
            segments
                .iter()
                .any(|s| s.node == db.node && s.drift == "missing")
        );
    }
}
