//! Node actions: what one step asks of one node, and the one place they become
//! protobuf.

use serde::{Deserialize, Serialize};

use crate::desired::{BootImage, DesiredTraffic};

/// A replica peer of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PeerRef {
    /// Node name.
    pub name: String,
    /// Address.
    pub address: String,
    /// Public key (hex), empty when the node did not answer.
    pub public_key_hex: String,
}

/// A volume of a migrating VM (`NodeAction::MigrateVm`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MigratingVolume {
    /// The volume's runtime name.
    pub name: String,
    /// The nodes holding a copy, the layout's primary first.
    pub copies: Vec<String>,
}

/// One node action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum NodeAction {
    /// `CreateVolume`.
    CreateVolume {
        /// Name.
        name: String,
        /// Size.
        size_bytes: u64,
        /// Stripe columns.
        stripe_width: u32,
        /// Stripe unit.
        stripe_unit_bytes: u64,
        /// Replica peers.
        replicas: Vec<PeerRef>,
    },
    /// `DeleteVolume`.
    DeleteVolume {
        /// Name.
        name: String,
    },
    /// `ResizeVolume`: grow in place, keeping the data (the node refuses a shrink).
    ResizeVolume {
        /// Name.
        name: String,
        /// The new size.
        size_bytes: u64,
    },
    /// `SnapshotVolume`: a copy-on-write snapshot, the same point of the write
    /// sequence on every in-sync copy (sent to the volume's writer).
    SnapshotVolume {
        /// The volume.
        volume: String,
        /// The snapshot's name (unique per volume).
        snapshot: String,
    },
    /// `DeleteSnapshot` on every copy of the volume (sent to its writer).
    DeleteSnapshot {
        /// The volume.
        volume: String,
        /// The snapshot.
        snapshot: String,
    },
    /// `CloneVolume`: a new volume `name`, copy-on-write from a snapshot, whose copies
    /// live where the source's do (sent to the source's writer).
    CloneVolume {
        /// The source volume.
        volume: String,
        /// Its snapshot.
        snapshot: String,
        /// The new volume.
        name: String,
    },
    /// `ImportImage`: an image's disk file written into its base volume (sent to the
    /// base's writer; `crate::images`).
    ImportImage {
        /// The base volume.
        volume: String,
        /// The disk file (absolute, read on the node).
        path: String,
        /// `raw` or `qcow2`.
        format: String,
        /// Where the spec names the file (`FILE:LINE:COL`).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        source: String,
    },
    /// `CreateVm`.
    CreateVm {
        /// Name.
        name: String,
        /// Each NIC's IPv4 address (IPAM), in the order of `nics`; empty: none.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        addresses: Vec<String>,
        /// vCPUs.
        vcpus: u32,
        /// Memory.
        memory_bytes: u64,
        /// Image.
        image: BootImage,
        /// Volumes attached.
        volumes: Vec<String>,
        /// Tenant (its NICs' bridges are per tenant network).
        #[serde(default)]
        tenant: String,
        /// NICs: tenant network names, in order.
        #[serde(default)]
        nics: Vec<String>,
        /// SLA class the node enforces with cgroups (empty: on-demand).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        sla: String,
        /// SLA priority (spot VMs are preempted lowest first).
        #[serde(default, skip_serializing_if = "is_zero")]
        priority: u32,
        /// Dedicated CPUs (its SLA profile's `cpu-pinning=#true`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        dedicated_cpus: bool,
        /// Its NICs' MTU: the segment MTU of its node's site (the guest bond's MTU
        /// minus 50); 0 (left out of the JSON): 1450, a 1500-byte underlay's.
        #[serde(default, skip_serializing_if = "is_zero")]
        nic_mtu: u32,
    },
    /// `StartVm`.
    StartVm {
        /// Name.
        name: String,
    },
    /// `StopVm`.
    StopVm {
        /// Name.
        name: String,
    },
    /// `DeleteVm`.
    DeleteVm {
        /// Name.
        name: String,
    },
    /// `migrate_vm`: a running VM moved live to this step's node (issue 17). Not one
    /// node request but the commander's sequence (`crate::migrate`): `definition` (a
    /// `CreateVm`) and `PrepareIncomingVm` here, `MigrateVm` on `from`, the durable
    /// commit record naming this node, `CommitMigration` on both, `DeleteVm` on `from`.
    MigrateVm {
        /// Name.
        name: String,
        /// The node it runs on now (the source).
        from: String,
        /// The source's address.
        from_address: String,
        /// The downtime the last pre-copy round may take (ms).
        max_downtime_ms: u32,
        /// The VM's definition on this node (a `create_vm`).
        definition: Box<NodeAction>,
        /// The VM's volumes, each with its copies (the layout's primary first): their
        /// writer (or, where this node holds no copy, their clients) is handed over in
        /// the commit (`crate::migrate`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        volumes: Vec<MigratingVolume>,
        /// The peer set (every node of the spec that answered, with its key) pushed to
        /// the volumes' copies and this node before the hand-over, so the new writer
        /// reaches the other copies and they know its key. Empty without volumes.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        peers: Vec<PeerRef>,
    },
    /// `protect_vm`: an FT VM running on this step's node (its primary) gets its
    /// secondary on `secondary` (issue 22). Not one node request but the commander's
    /// sequence (`crate::ft`): `definition` (a `CreateVm`) and `PrepareFtSecondary` on
    /// the secondary's node, then `StartFt` here to the address the secondary
    /// listens on; both sides hold the witness's `vm/NAME` from then.
    ProtectVm {
        /// Name.
        name: String,
        /// The secondary's node.
        secondary: String,
        /// Its address.
        secondary_address: String,
        /// The VM's definition on the secondary's node (a `create_vm`).
        definition: Box<NodeAction>,
        /// The site's witness `HOST:PORT` (empty: none).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        witness: String,
        /// Checkpoint epoch (ms; 0: the node's default, 30).
        #[serde(default, skip_serializing_if = "is_zero")]
        epoch_ms: u32,
    },
    /// `ApplyBond`: create, change or repair a bond and its QoS classes.
    ApplyBond {
        /// Name (the device).
        name: String,
        /// Mode.
        mode: String,
        /// Member NICs.
        members: Vec<String>,
        /// MTU.
        mtu: u32,
        /// Link-monitoring interval (ms).
        miimon_ms: u32,
        /// Capacity for the HTB root (bit/s).
        capacity_bps: u64,
        /// Traffic classes.
        traffic: Vec<DesiredTraffic>,
    },
    /// `DeleteBond`.
    DeleteBond {
        /// Name.
        name: String,
    },
    /// `SetProtection`: the VM's snapshot schedule, held and run by the writer of its
    /// volumes (`every_ms` 0 removes it; issue 18).
    SetProtection {
        /// The VM.
        vm: String,
        /// The protection plan.
        plan: String,
        /// The VM's volumes (all its disks).
        volumes: Vec<String>,
        /// Interval (ms); 0 removes the schedule.
        every_ms: u64,
        /// Scheduled snapshots kept per volume.
        keep: u32,
    },
    /// `ApplyNetworkSegment`: make, change or repair a tenant network's segment on
    /// the node (issue 19).
    // The segment is the one `Desired` holds, shared (a plan from nothing at
    // 100,000 VMs has two million of these steps); a comment, not schema text.
    ApplyNetworkSegment(std::sync::Arc<crate::segments::DesiredSegment>),
    /// `DeleteNetworkSegment`.
    DeleteNetworkSegment {
        /// Tenant.
        tenant: String,
        /// Network.
        network: String,
    },
    /// `ReplicateVolume`: the source volume's writer ships its snapshots to the DR
    /// copy at another site every `every_ms` (0 removes the schedule; issue 18).
    ReplicateVolume {
        /// The source volume.
        volume: String,
        /// The node holding the DR copy's writer.
        target: PeerRef,
        /// The DR copy.
        target_volume: String,
        /// Interval (ms); 0 removes the schedule.
        every_ms: u64,
        /// Snapshots the DR copy keeps.
        keep: u32,
    },
    /// `AcceptReplication`: the DR copy's writer lets `source` (and only it) ship
    /// into `volume` (an empty source name stops accepting).
    AcceptReplication {
        /// The DR copy.
        volume: String,
        /// The source volume's writer.
        source: PeerRef,
    },
}

impl NodeAction {
    /// `create_volume`, ...
    pub fn word(&self) -> &'static str {
        match self {
            NodeAction::CreateVolume { .. } => "create_volume",
            NodeAction::DeleteVolume { .. } => "delete_volume",
            NodeAction::ResizeVolume { .. } => "resize_volume",
            NodeAction::SnapshotVolume { .. } => "snapshot_volume",
            NodeAction::DeleteSnapshot { .. } => "delete_snapshot",
            NodeAction::CloneVolume { .. } => "clone_volume",
            NodeAction::ImportImage { .. } => "import_image",
            NodeAction::CreateVm { .. } => "create_vm",
            NodeAction::StartVm { .. } => "start_vm",
            NodeAction::StopVm { .. } => "stop_vm",
            NodeAction::DeleteVm { .. } => "delete_vm",
            NodeAction::MigrateVm { .. } => "migrate_vm",
            NodeAction::ProtectVm { .. } => "protect_vm",
            NodeAction::ApplyBond { .. } => "apply_bond",
            NodeAction::DeleteBond { .. } => "delete_bond",
            NodeAction::SetProtection { .. } => "set_protection",
            NodeAction::ApplyNetworkSegment(_) => "apply_network_segment",
            NodeAction::DeleteNetworkSegment { .. } => "delete_network_segment",
            NodeAction::ReplicateVolume { .. } => "replicate_volume",
            NodeAction::AcceptReplication { .. } => "accept_replication",
        }
    }

    /// The object's name (a snapshot action's: the snapshot's).
    pub fn name(&self) -> &str {
        match self {
            NodeAction::SnapshotVolume { snapshot, .. }
            | NodeAction::DeleteSnapshot { snapshot, .. } => snapshot,
            NodeAction::CloneVolume { name, .. } => name,
            NodeAction::ImportImage { volume, .. } => volume,
            NodeAction::CreateVolume { name, .. }
            | NodeAction::DeleteVolume { name }
            | NodeAction::ResizeVolume { name, .. }
            | NodeAction::CreateVm { name, .. }
            | NodeAction::StartVm { name }
            | NodeAction::StopVm { name }
            | NodeAction::DeleteVm { name }
            | NodeAction::MigrateVm { name, .. }
            | NodeAction::ProtectVm { name, .. }
            | NodeAction::ApplyBond { name, .. }
            | NodeAction::DeleteBond { name } => name,
            NodeAction::SetProtection { vm, .. } => vm,
            NodeAction::ApplyNetworkSegment(segment) => &segment.network,
            NodeAction::DeleteNetworkSegment { network, .. } => network,
            NodeAction::ReplicateVolume { volume, .. }
            | NodeAction::AcceptReplication { volume, .. } => volume,
        }
    }

    /// The wire request (the one place actions become protobuf). A `migrate_vm` is
    /// several requests (`crate::migrate`); its first, the destination's `CreateVm`,
    /// is what this returns for it. A `protect_vm` is several too (`crate::ft`); this
    /// returns its last, the primary's `StartFt`, without the secondary's address
    /// (known only once the secondary listens).
    pub fn to_request(&self, request_id: &str) -> proto::v1::ApplyRequest {
        use proto::v1::apply_request::Action;
        use proto::v1::create_vm::Image;
        let action = match self {
            NodeAction::MigrateVm { definition, .. } => {
                return definition.to_request(request_id);
            }
            NodeAction::ProtectVm {
                name,
                witness,
                epoch_ms,
                ..
            } => Action::StartFt(proto::v1::StartFt {
                name: name.clone(),
                to: String::new(),
                epoch_ms: *epoch_ms,
                sync_disks: true,
                timeout_ms: 0,
                witness: witness.clone(),
                witness_lease_ms: 0,
            }),
            NodeAction::CreateVolume {
                name,
                size_bytes,
                stripe_width,
                stripe_unit_bytes,
                replicas,
            } => Action::CreateVolume(proto::v1::CreateVolume {
                name: name.clone(),
                size_bytes: *size_bytes,
                stripe_width: *stripe_width,
                stripe_unit_bytes: *stripe_unit_bytes,
                replica_peers: replicas
                    .iter()
                    .map(|p| proto::v1::Peer {
                        name: p.name.clone(),
                        address: p.address.clone(),
                        public_key_hex: p.public_key_hex.clone(),
                    })
                    .collect(),
            }),
            NodeAction::DeleteVolume { name } => {
                Action::DeleteVolume(proto::v1::DeleteVolume { name: name.clone() })
            }
            NodeAction::ResizeVolume { name, size_bytes } => {
                Action::ResizeVolume(proto::v1::ResizeVolume {
                    name: name.clone(),
                    size_bytes: *size_bytes,
                })
            }
            NodeAction::SnapshotVolume { volume, snapshot } => {
                Action::SnapshotVolume(proto::v1::SnapshotVolume {
                    volume: volume.clone(),
                    snapshot: snapshot.clone(),
                })
            }
            NodeAction::DeleteSnapshot { volume, snapshot } => {
                Action::DeleteSnapshot(proto::v1::DeleteSnapshot {
                    volume: volume.clone(),
                    snapshot: snapshot.clone(),
                })
            }
            NodeAction::CloneVolume {
                volume,
                snapshot,
                name,
            } => Action::CloneVolume(proto::v1::CloneVolume {
                volume: volume.clone(),
                snapshot: snapshot.clone(),
                name: name.clone(),
            }),
            NodeAction::ImportImage {
                volume,
                path,
                format,
                source,
            } => Action::ImportImage(proto::v1::ImportImage {
                volume: volume.clone(),
                path: path.clone(),
                format: format.clone(),
                source: source.clone(),
            }),
            NodeAction::CreateVm {
                addresses,
                name,
                vcpus,
                memory_bytes,
                image,
                volumes,
                tenant,
                nics,
                sla,
                priority,
                dedicated_cpus,
                nic_mtu,
            } => Action::CreateVm(proto::v1::CreateVm {
                name: name.clone(),
                vcpus: *vcpus,
                memory_bytes: *memory_bytes,
                image: Some(match image {
                    BootImage::Builtin(b) => Image::Builtin(b.clone()),
                    BootImage::Kernel {
                        kernel,
                        initrd,
                        cmdline,
                    } => Image::Kernel(proto::v1::KernelImage {
                        kernel_path: kernel.clone(),
                        initrd_path: initrd.clone(),
                        cmdline: cmdline.clone(),
                    }),
                }),
                volumes: volumes.clone(),
                tenant: tenant.clone(),
                // Each NIC's IPAM address, in order ("" where it has none).
                nics: nics
                    .iter()
                    .enumerate()
                    .map(|(i, network)| proto::v1::VmNic {
                        network: network.clone(),
                        // The segments' MTU, so the tap and the segment agree on the
                        // bridge's (crate::segments).
                        mtu: if *nic_mtu == 0 {
                            crate::segments::SEGMENT_MTU
                        } else {
                            *nic_mtu
                        },
                        ipv4: addresses.get(i).cloned().unwrap_or_default(),
                    })
                    .collect(),
                sla: sla.clone(),
                priority: *priority,
                dedicated_cpus: *dedicated_cpus,
            }),
            NodeAction::StartVm { name } => {
                Action::StartVm(proto::v1::StartVm { name: name.clone() })
            }
            NodeAction::StopVm { name } => Action::StopVm(proto::v1::StopVm {
                name: name.clone(),
                grace_ms: 0,
            }),
            NodeAction::DeleteVm { name } => {
                Action::DeleteVm(proto::v1::DeleteVm { name: name.clone() })
            }
            NodeAction::ApplyBond {
                name,
                mode,
                members,
                mtu,
                miimon_ms,
                capacity_bps,
                traffic,
            } => Action::ApplyBond(proto::v1::ApplyBond {
                name: name.clone(),
                mode: mode.clone(),
                members: members.clone(),
                mtu: *mtu,
                traffic: traffic
                    .iter()
                    .map(|t| proto::v1::TrafficClass {
                        name: t.name.clone(),
                        min_bps: t.min_bps,
                        max_bps: t.max_bps,
                        weight: t.weight,
                    })
                    .collect(),
                capacity_bps: *capacity_bps,
                miimon_ms: *miimon_ms,
            }),
            NodeAction::DeleteBond { name } => {
                Action::DeleteBond(proto::v1::DeleteBond { name: name.clone() })
            }
            NodeAction::SetProtection {
                vm,
                plan,
                volumes,
                every_ms,
                keep,
            } => Action::SetProtection(proto::v1::SetProtection {
                vm: vm.clone(),
                plan: plan.clone(),
                volumes: volumes.clone(),
                every_ms: *every_ms,
                keep: *keep,
            }),
            NodeAction::ApplyNetworkSegment(segment) => {
                Action::ApplyNetworkSegment(segment_request(segment))
            }
            NodeAction::DeleteNetworkSegment { tenant, network } => {
                Action::DeleteNetworkSegment(proto::v1::DeleteNetworkSegment {
                    tenant: tenant.clone(),
                    network: network.clone(),
                })
            }
            NodeAction::ReplicateVolume {
                volume,
                target,
                target_volume,
                every_ms,
                keep,
            } => Action::ReplicateVolume(proto::v1::ReplicateVolume {
                volume: volume.clone(),
                target: Some(peer(target)),
                target_volume: target_volume.clone(),
                every_ms: *every_ms,
                keep: *keep,
                now: false,
            }),
            NodeAction::AcceptReplication { volume, source } => {
                Action::AcceptReplication(proto::v1::AcceptReplication {
                    volume: volume.clone(),
                    source: Some(peer(source)),
                })
            }
        };
        proto::v1::ApplyRequest {
            request_id: request_id.to_owned(),
            action: Some(action),
        }
    }
}

fn segment_request(s: &crate::segments::DesiredSegment) -> proto::v1::ApplyNetworkSegment {
    proto::v1::ApplyNetworkSegment {
        tenant: s.tenant.clone(),
        network: s.network.clone(),
        vni: s.vni,
        mtu: s.mtu,
        local_vtep: s.local_vtep.clone(),
        gateway: s.gateway.clone(),
        prefix_len: s.prefix_len,
        remotes: s
            .remotes
            .iter()
            .map(|r| proto::v1::SegmentRemote {
                vm: r.vm.clone(),
                mac: r.mac.clone(),
                ipv4: r.ipv4.clone(),
                vtep: r.vtep.clone(),
                also_vtep: r.also_vtep.clone(),
            })
            .collect(),
        guarded: s
            .guarded
            .iter()
            .map(|g| proto::v1::GuardedNic {
                vm: g.vm.clone(),
                nic: g.nic,
                network: g.network.clone(),
                ipv4: g.ipv4.clone(),
                groups: g.groups.clone(),
                allow: g
                    .allow
                    .iter()
                    .map(|r| proto::v1::SecurityRule {
                        group: r.group.clone(),
                        from_cidr: r.from_cidr.clone(),
                        to_cidr: r.to_cidr.clone(),
                        proto: r.proto.clone(),
                        port: r.port,
                        port_end: r.port_end,
                    })
                    .collect(),
            })
            .collect(),
        external: s.external,
        underlay_prefix_len: s.underlay_prefix_len,
        underlay_device: s.underlay_device.clone(),
        ipv6_gateway: s.ipv6_gateway.clone(),
    }
}

/// SHA-256 (hex) of the `ApplyNetworkSegment` this segment is sent as: equal to the
/// `definition_digest` a node reports for the definition it keeps.
pub fn segment_digest(s: &crate::segments::DesiredSegment) -> String {
    use prost::Message;
    use sha2::Digest;
    sha2::Sha256::digest(segment_request(s).encode_to_vec())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// A peer as the node API names it.
fn peer(p: &PeerRef) -> proto::v1::Peer {
    proto::v1::Peer {
        name: p.name.clone(),
        address: p.address.clone(),
        public_key_hex: p.public_key_hex.clone(),
    }
}
