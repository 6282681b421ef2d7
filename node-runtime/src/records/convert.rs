//! The one place where wire types (`proto::v1`) become records and back.
//!
//! Every conversion destructures or builds the wire message field by field, without
//! `..Default::default()`: a field added to the contract fails to compile here until
//! someone decides whether the node keeps it (and, if so, gives the record a new
//! version).

use proto::v1;

use super::types::{
    BondRecord, ClientVolumeRecord, Peer, PeerRecord, TrafficClass, VmDefinition, VmImage, VmNic,
    VmRecord, VolumeRole,
};

/// A `SetVolumeEpoch` as a node holding no copy of the volume keeps it.
pub fn client_volume_record(wire: &v1::SetVolumeEpoch) -> ClientVolumeRecord {
    let v1::SetVolumeEpoch {
        name: _,
        epoch,
        writer,
        in_sync,
        clients,
    } = wire;
    ClientVolumeRecord {
        version: ClientVolumeRecord::VERSION,
        epoch: *epoch,
        writer: writer.clone(),
        in_sync: in_sync.clone(),
        clients: clients.clone(),
    }
}

/// A wire peer as kept in a record.
pub fn peer(wire: &v1::Peer) -> Peer {
    let v1::Peer {
        name,
        address,
        public_key_hex,
    } = wire;
    Peer {
        name: name.clone(),
        address: address.clone(),
        public_key_hex: public_key_hex.clone(),
    }
}

/// A kept peer on the wire.
pub fn wire_peer(peer: &Peer) -> v1::Peer {
    v1::Peer {
        name: peer.name.clone(),
        address: peer.address.clone(),
        public_key_hex: peer.public_key_hex.clone(),
    }
}

/// A pushed peer's record.
pub fn peer_record(wire: &v1::Peer) -> PeerRecord {
    PeerRecord {
        version: PeerRecord::VERSION,
        peer: peer(wire),
    }
}

/// A volume role on the wire.
pub fn volume_role(role: VolumeRole) -> v1::VolumeRole {
    match role {
        VolumeRole::Primary => v1::VolumeRole::Primary,
        VolumeRole::Replica => v1::VolumeRole::Replica,
    }
}

/// A `CreateVm` as the node keeps it.
pub fn vm_definition(wire: &v1::CreateVm) -> VmDefinition {
    let v1::CreateVm {
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
    } = wire;
    VmDefinition {
        name: name.clone(),
        vcpus: *vcpus,
        memory_bytes: *memory_bytes,
        image: image.as_ref().map(|image| match image {
            v1::create_vm::Image::Builtin(name) => VmImage::Builtin(name.clone()),
            v1::create_vm::Image::Kernel(kernel) => {
                let v1::KernelImage {
                    kernel_path,
                    initrd_path,
                    cmdline,
                } = kernel;
                VmImage::Kernel {
                    kernel_path: kernel_path.clone(),
                    initrd_path: initrd_path.clone(),
                    cmdline: cmdline.clone(),
                }
            }
        }),
        volumes: volumes.clone(),
        tenant: tenant.clone(),
        nics: nics
            .iter()
            .map(|nic| {
                let v1::VmNic { network, mtu, ipv4 } = nic;
                VmNic {
                    network: network.clone(),
                    mtu: *mtu,
                    ipv4: ipv4.clone(),
                }
            })
            .collect(),
        sla: sla.clone(),
        priority: *priority,
        dedicated_cpus: *dedicated_cpus,
    }
}

/// A VM's record: its `CreateVm` (if any) and what it should be doing.
pub fn vm_record(
    definition: Option<&v1::CreateVm>,
    desired_running: bool,
    last_pid: u32,
) -> VmRecord {
    VmRecord {
        version: VmRecord::VERSION,
        definition: definition.map(vm_definition),
        desired_running,
        last_pid,
        last_start_ticks: 0,
        incarnation: String::new(),
    }
}

/// A kept VM definition as the `CreateVm` it came from.
pub fn create_vm(definition: VmDefinition) -> v1::CreateVm {
    let VmDefinition {
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
    } = definition;
    v1::CreateVm {
        name,
        vcpus,
        memory_bytes,
        image: image.map(|image| match image {
            VmImage::Builtin(name) => v1::create_vm::Image::Builtin(name),
            VmImage::Kernel {
                kernel_path,
                initrd_path,
                cmdline,
            } => v1::create_vm::Image::Kernel(v1::KernelImage {
                kernel_path,
                initrd_path,
                cmdline,
            }),
        }),
        volumes,
        tenant,
        nics: nics
            .into_iter()
            .map(|nic| v1::VmNic {
                network: nic.network,
                mtu: nic.mtu,
                ipv4: nic.ipv4,
            })
            .collect(),
        sla,
        priority,
        dedicated_cpus,
    }
}

/// An `ApplyBond` as the node keeps it.
pub fn bond_record(wire: &v1::ApplyBond) -> BondRecord {
    let v1::ApplyBond {
        name,
        mode,
        members,
        mtu,
        traffic,
        capacity_bps,
        miimon_ms,
    } = wire;
    BondRecord {
        version: BondRecord::VERSION,
        name: name.clone(),
        mode: mode.clone(),
        members: members.clone(),
        mtu: *mtu,
        traffic: traffic
            .iter()
            .map(|class| {
                let v1::TrafficClass {
                    name,
                    min_bps,
                    max_bps,
                    weight,
                } = class;
                TrafficClass {
                    name: name.clone(),
                    min_bps: *min_bps,
                    max_bps: *max_bps,
                    weight: *weight,
                }
            })
            .collect(),
        capacity_bps: *capacity_bps,
        miimon_ms: *miimon_ms,
    }
}

/// A kept bond as the `ApplyBond` it came from.
pub fn apply_bond(record: &BondRecord) -> v1::ApplyBond {
    v1::ApplyBond {
        name: record.name.clone(),
        mode: record.mode.clone(),
        members: record.members.clone(),
        mtu: record.mtu,
        traffic: record
            .traffic
            .iter()
            .map(|class| v1::TrafficClass {
                name: class.name.clone(),
                min_bps: class.min_bps,
                max_bps: class.max_bps,
                weight: class.weight,
            })
            .collect(),
        capacity_bps: record.capacity_bps,
        miimon_ms: record.miimon_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_definitions_round_trip_through_records() {
        let kernel = v1::CreateVm {
            name: "web-1".into(),
            vcpus: 2,
            memory_bytes: 256 << 20,
            image: Some(v1::create_vm::Image::Kernel(v1::KernelImage {
                kernel_path: "/boot/vmlinuz".into(),
                initrd_path: "/boot/initrd".into(),
                cmdline: "console=ttyS0".into(),
            })),
            volumes: vec!["web-1-root".into()],
            tenant: "finance".into(),
            nics: vec![v1::VmNic {
                network: "front".into(),
                mtu: 9000,
                ipv4: "10.0.0.2".into(),
            }],
            sla: "reserved".into(),
            priority: 1000,
            dedicated_cpus: true,
        };
        assert_eq!(create_vm(vm_definition(&kernel)), kernel);
        let builtin = v1::CreateVm {
            image: Some(v1::create_vm::Image::Builtin("cairn-guest".into())),
            ..kernel.clone()
        };
        assert_eq!(create_vm(vm_definition(&builtin)), builtin);
        let bare = v1::CreateVm::default();
        assert_eq!(create_vm(vm_definition(&bare)), bare);
        let bond = v1::ApplyBond {
            name: "bond0".into(),
            mode: "active-backup".into(),
            members: vec!["eth0".into(), "eth1".into()],
            mtu: 9000,
            traffic: vec![v1::TrafficClass {
                name: "storage".into(),
                min_bps: 300_000_000,
                max_bps: 1_000_000_000,
                weight: 4,
            }],
            capacity_bps: 10_000_000_000,
            miimon_ms: 50,
        };
        assert_eq!(apply_bond(&bond_record(&bond)), bond);
        let wire = v1::Peer {
            name: "lab-2".into(),
            address: "127.0.0.1:7101".into(),
            public_key_hex: "ab".repeat(32),
        };
        assert_eq!(wire_peer(&peer(&wire)), wire);
    }
}
