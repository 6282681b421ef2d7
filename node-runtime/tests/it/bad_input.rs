//! Malformed and out-of-range requests get InvalidArgument naming the field.

use proto::v1::{
    ApplyBond, ApplyRequest, CreateVm, CreateVolume, Peer, ReadVolumeRequest, SetPeers, StartVm,
    TrafficClass, WriteVolume, apply_request::Action, create_vm::Image,
};
use tonic::Code;

use crate::harness::{TestNode, apply_ok, controller, request};

fn volume(name: &str, size_bytes: u64, stripe_width: u32, stripe_unit_bytes: u64) -> Action {
    Action::CreateVolume(CreateVolume {
        name: name.into(),
        size_bytes,
        stripe_width,
        stripe_unit_bytes,
        replica_peers: vec![],
    })
}

fn vm(vcpus: u32, memory_bytes: u64, image: Option<Image>) -> Action {
    Action::CreateVm(CreateVm {
        name: "vm-1".into(),
        vcpus,
        memory_bytes,
        image,
        volumes: vec![],
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_name_the_field_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let node = TestNode::start("bad-1", dir.path(), &controller);
    let mut client = node.client(&controller).await;
    apply_ok(&mut client, "setup", volume("v", 1 << 20, 1, 4096)).await;

    let builtin = || Some(Image::Builtin("cairn-guest".into()));
    let cases: Vec<(ApplyRequest, &str, &str)> = vec![
        (
            request("", volume("v", 4096, 1, 4096)),
            "apply_request.request_id",
            "must not be empty",
        ),
        (
            request("has space", volume("v", 4096, 1, 4096)),
            "apply_request.request_id",
            "contains ` `",
        ),
        (
            ApplyRequest {
                request_id: "no-action".into(),
                action: None,
            },
            "apply_request.action",
            "must be set",
        ),
        (
            request("r1", volume("Bad_Name", 4096, 1, 4096)),
            "create_volume.name",
            "DNS label",
        ),
        (
            request("r2", volume("x", 1000, 1, 4096)),
            "create_volume.size_bytes",
            "not a multiple of 4096",
        ),
        (
            request("r3", volume("x", 0, 1, 4096)),
            "create_volume.size_bytes",
            "at least 4096",
        ),
        (
            request("r4", volume("x", 1 << 60, 1, 4096)),
            "create_volume.size_bytes",
            "larger than the maximum",
        ),
        (
            request("r5", volume("x", 4096, 0, 4096)),
            "create_volume.stripe_width",
            "out of range",
        ),
        (
            request("r6", volume("x", 4096, 65, 4096)),
            "create_volume.stripe_width",
            "out of range",
        ),
        (
            request("r7", volume("x", 4096, 1, 3000)),
            "create_volume.stripe_unit_bytes",
            "power of two",
        ),
        (
            request("r8", volume("x", 4096, 1, 128 << 20)),
            "create_volume.stripe_unit_bytes",
            "power of two",
        ),
        (
            request(
                "r9",
                Action::CreateVolume(CreateVolume {
                    name: "x".into(),
                    size_bytes: 4096,
                    stripe_width: 1,
                    stripe_unit_bytes: 4096,
                    replica_peers: vec![Peer {
                        name: "bad-1".into(),
                        address: "127.0.0.1:1".into(),
                        public_key_hex: String::new(),
                    }],
                }),
            ),
            "create_volume.replica_peers[0].name",
            "this node",
        ),
        (
            request(
                "r10",
                Action::CreateVolume(CreateVolume {
                    name: "x".into(),
                    size_bytes: 4096,
                    stripe_width: 1,
                    stripe_unit_bytes: 4096,
                    replica_peers: vec![Peer {
                        name: "other".into(),
                        address: "nowhere".into(),
                        public_key_hex: String::new(),
                    }],
                }),
            ),
            "create_volume.replica_peers[0].address",
            "HOST:PORT",
        ),
        (
            request(
                "w1",
                Action::WriteVolume(WriteVolume {
                    name: "v".into(),
                    offset: 100,
                    data: vec![0; 4096],
                }),
            ),
            "write_volume.offset",
            "multiple of 4096",
        ),
        (
            request(
                "w2",
                Action::WriteVolume(WriteVolume {
                    name: "v".into(),
                    offset: 0,
                    data: vec![0; 100],
                }),
            ),
            "write_volume.length",
            "multiple of 4096",
        ),
        (
            request(
                "w3",
                Action::WriteVolume(WriteVolume {
                    name: "v".into(),
                    offset: 1 << 20,
                    data: vec![0; 4096],
                }),
            ),
            "write_volume.offset",
            "beyond the volume's size",
        ),
        (
            request(
                "w4",
                Action::WriteVolume(WriteVolume {
                    name: "v".into(),
                    offset: 0,
                    data: vec![],
                }),
            ),
            "write_volume.data",
            "must not be empty",
        ),
        (
            request(
                "w5",
                Action::WriteVolume(WriteVolume {
                    name: "v".into(),
                    offset: u64::MAX - 4095,
                    data: vec![0; 4096],
                }),
            ),
            "write_volume.offset",
            "beyond",
        ),
        (
            request("m1", vm(0, 64 << 20, builtin())),
            "create_vm.vcpus",
            "0 is less than the minimum of 1",
        ),
        (
            request("m2", vm(1, 1000, builtin())),
            "create_vm.memory_bytes",
            "1000 bytes is not a multiple of 1MiB",
        ),
        // The limits cairn-vmm has (vm_config::limits), not the node's old 1..=255.
        (
            request("m6", vm(65, 64 << 20, builtin())),
            "create_vm.vcpus",
            "65 is more than the maximum of 64",
        ),
        (
            request("m7", vm(1, 8 << 20, builtin())),
            "create_vm.memory_bytes",
            "8MiB is less than the minimum of 16MiB",
        ),
        (
            request(
                "m8",
                vm(
                    33,
                    64 << 20,
                    Some(Image::Kernel(proto::v1::KernelImage {
                        kernel_path: "/boot/vmlinuz".into(),
                        ..Default::default()
                    })),
                ),
            ),
            "create_vm.vcpus",
            "33 is more than the maximum of 32",
        ),
        (
            request("m3", vm(1, 64 << 20, None)),
            "create_vm.image",
            "must be set",
        ),
        (
            request("m4", vm(1, 64 << 20, Some(Image::Builtin("doom".into())))),
            "create_vm.builtin",
            "not a built-in image",
        ),
        (
            request(
                "m5",
                Action::CreateVm(CreateVm {
                    name: "vm-2".into(),
                    vcpus: 1,
                    memory_bytes: 64 << 20,
                    image: builtin(),
                    volumes: vec!["nope".into()],
                    ..Default::default()
                }),
            ),
            "create_vm.volumes[0]",
            "does not exist",
        ),
        (
            request(
                "b1",
                Action::ApplyBond(ApplyBond {
                    name: "data".into(),
                    mode: "fastest".into(),
                    members: vec!["eth0".into()],
                    mtu: 1500,
                    traffic: vec![],
                    capacity_bps: 0,
                    miimon_ms: 0,
                }),
            ),
            "apply_bond.mode",
            "not one of",
        ),
        (
            request(
                "b2",
                Action::ApplyBond(ApplyBond {
                    name: "data".into(),
                    mode: "active-backup".into(),
                    members: vec![],
                    mtu: 1500,
                    traffic: vec![],
                    capacity_bps: 0,
                    miimon_ms: 0,
                }),
            ),
            "apply_bond.members",
            "at least one",
        ),
        (
            request(
                "b3",
                Action::ApplyBond(ApplyBond {
                    name: "data".into(),
                    mode: "active-backup".into(),
                    members: vec!["eth0".into()],
                    mtu: 9000,
                    traffic: vec![TrafficClass {
                        name: "video".into(),
                        min_bps: 1,
                        max_bps: 0,
                        weight: 1,
                    }],
                    capacity_bps: 0,
                    miimon_ms: 0,
                }),
            ),
            "apply_bond.traffic[0].name",
            "not one of",
        ),
        (
            request(
                "p1",
                Action::SetPeers(SetPeers {
                    peers: vec![Peer {
                        name: "n2".into(),
                        address: "127.0.0.1:7000".into(),
                        public_key_hex: "zz".into(),
                    }],
                }),
            ),
            "set_peers.peers[0].public_key_hex",
            "hex",
        ),
    ];
    for (apply, field, problem) in cases {
        let id = apply.request_id.clone();
        let status = client
            .apply(apply)
            .await
            .expect_err(&format!("request {id:?} must be refused"));
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "request {id:?}: {status:?}"
        );
        assert!(
            status.message().contains(&format!("`{field}`")) && status.message().contains(problem),
            "request {id:?}: message {:?} should name `{field}` and say {problem:?}",
            status.message()
        );
    }

    let bad_read = client
        .read_volume(ReadVolumeRequest {
            name: "v".into(),
            offset: 0,
            length: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_read.code(), Code::InvalidArgument);
    assert!(
        bad_read.message().contains("read_volume_request.length"),
        "{}",
        bad_read.message()
    );
    let too_long = client
        .read_volume(ReadVolumeRequest {
            name: "v".into(),
            offset: 0,
            length: 64 << 20,
        })
        .await
        .unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument);

    let Err(watch) = client.watch(5).await else {
        panic!("heartbeat interval 5 ms must be refused");
    };
    assert_eq!(watch.code(), Code::InvalidArgument);
    assert!(
        watch
            .message()
            .contains("watch_request.heartbeat_interval_ms")
    );

    // Unknown objects are NotFound, not InvalidArgument, and name the object.
    let missing = client
        .read_volume(ReadVolumeRequest {
            name: "ghost".into(),
            offset: 0,
            length: 4096,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("ghost"));
    let missing_vm = client
        .apply(request(
            "s1",
            Action::StartVm(StartVm {
                name: "ghost".into(),
            }),
        ))
        .await
        .unwrap_err();
    assert_eq!(missing_vm.code(), Code::NotFound);

    // The node is still healthy after all of that.
    assert_eq!(client.get_inventory().await.unwrap().node_name, "bad-1");
}
