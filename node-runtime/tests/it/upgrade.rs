//! A rolling upgrade reads what the previous version wrote: a node whose `node.redb` is
//! in the previous format (prost records, no format row) keeps its volumes, VMs, peer
//! set and request ids (nodes on 127.0.0.91-92).

use node_runtime::records::{
    self, BondRecord, PeerRecord, Records, RequestRecord, VmRecord, VolumeRecord,
};
use proto::v1::{
    CreateVm, CreateVolume, KernelImage, Peer, ReadVolumeRequest, SetPeers, WriteVolume,
    apply_request::Action, create_vm::Image,
};
use redb::{Database, TableDefinition};

use crate::harness::{TestNode, apply_ok, controller, pattern};

fn raw(name: &'static str) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

/// Rewrites a stopped node's records as the previous version stored them: every record
/// in its prost form, and no `meta` table.
fn downgrade_to_format_1(path: &std::path::Path) {
    let records = Records::open(path).unwrap();
    let mut rows: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
    for (key, record) in records.list::<VolumeRecord>().unwrap() {
        rows.push(("volumes", key, records::legacy::encode::volume(&record)));
    }
    for (key, record) in records.list::<VmRecord>().unwrap() {
        rows.push(("vms", key, records::legacy::encode::vm(&record)));
    }
    for (key, record) in records.list::<BondRecord>().unwrap() {
        rows.push(("bonds", key, records::legacy::encode::bond(&record)));
    }
    for (key, record) in records.list::<PeerRecord>().unwrap() {
        rows.push(("peers", key, records::legacy::encode::peer(&record)));
    }
    for (key, record) in records.list::<RequestRecord>().unwrap() {
        rows.push(("requests", key, records::legacy::encode::request(&record)));
    }
    drop(records);
    let database = Database::create(path).unwrap();
    let transaction = database.begin_write().unwrap();
    for (table, key, bytes) in &rows {
        transaction
            .open_table(raw(table))
            .unwrap()
            .insert(key.as_str(), bytes.as_slice())
            .unwrap();
    }
    assert!(
        transaction
            .delete_table(TableDefinition::<&str, u64>::new("meta"))
            .unwrap()
    );
    transaction.commit().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_keeps_what_the_previous_version_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller();
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    let mut node = TestNode::start_on("up-1", dir.path(), &controller, "127.0.0.91");
    let mut client = node.client(&controller).await;

    let create = Action::CreateVolume(CreateVolume {
        name: "data".into(),
        size_bytes: 8 << 20,
        stripe_width: 2,
        stripe_unit_bytes: 64 << 10,
        replica_peers: vec![],
    });
    let created = apply_ok(&mut client, "create-data", create.clone()).await;
    let data = pattern(91, 128 << 10);
    apply_ok(
        &mut client,
        "write-data",
        Action::WriteVolume(WriteVolume {
            name: "data".into(),
            offset: 64 << 10,
            data: data.clone(),
        }),
    )
    .await;
    apply_ok(
        &mut client,
        "vm-builtin",
        Action::CreateVm(CreateVm {
            name: "guest".into(),
            vcpus: 1,
            memory_bytes: 32 << 20,
            image: Some(Image::Builtin("cairn-guest".into())),
            ..Default::default()
        }),
    )
    .await;
    apply_ok(
        &mut client,
        "vm-kernel",
        Action::CreateVm(CreateVm {
            name: "linux".into(),
            vcpus: 2,
            memory_bytes: 64 << 20,
            image: Some(Image::Kernel(KernelImage {
                kernel_path: kernel.display().to_string(),
                initrd_path: String::new(),
                cmdline: "console=ttyS0".into(),
            })),
            volumes: vec!["data".into()],
            tenant: "finance".into(),
            nics: vec![],
            ..Default::default()
        }),
    )
    .await;
    let lab_2 = proto::auth::Identity::generate().unwrap();
    apply_ok(
        &mut client,
        "peers",
        Action::SetPeers(SetPeers {
            peers: vec![Peer {
                name: "lab-2".into(),
                address: "127.0.0.92:7100".into(),
                public_key_hex: lab_2.public_key_hex(),
            }],
        }),
    )
    .await;
    let before = client.observe().await.unwrap();
    assert_eq!(node.terminate(), Some(0), "{}", node.log());

    let records = dir.path().join("node.redb");
    // One volume, two VMs, one peer and five request ids.
    downgrade_to_format_1(&records);

    let node = TestNode::start_at("up-1", dir.path(), "127.0.0.91:0");
    let mut client = node.client(&controller).await;
    assert!(
        node.log()
            .contains("converted 9 record(s) of node.redb from the previous format to format 2"),
        "{}",
        node.log()
    );
    let after = client.observe().await.unwrap();
    assert_eq!(after.volumes, before.volumes, "{}", node.log());
    assert_eq!(after.peers, before.peers);
    assert_eq!(after.vms.len(), 2);
    for (vm_after, vm_before) in after.vms.iter().zip(&before.vms) {
        assert_eq!(vm_after.name, vm_before.name);
        assert_eq!(vm_after.state, vm_before.state);
        assert_eq!(vm_after.image_builtin, vm_before.image_builtin);
        assert_eq!(vm_after.kernel_path, vm_before.kernel_path);
    }
    let read = client
        .read_volume(ReadVolumeRequest {
            name: "data".into(),
            offset: 64 << 10,
            length: data.len() as u64,
        })
        .await
        .unwrap();
    assert!(read == data, "the volume's data is where it was");
    // A request id recorded by the previous version is still answered from its record.
    let replayed = apply_ok(&mut client, "create-data", create).await;
    assert!(replayed.replayed);
    assert_eq!(replayed.result, created.result);
    assert_eq!(replayed.applied_at_unix_ms, created.applied_at_unix_ms);
    // The same definition is still the same VM (CreateVm is idempotent only for an
    // equal definition, so this proves the kept definition equals the one sent).
    apply_ok(
        &mut client,
        "vm-builtin-again",
        Action::CreateVm(CreateVm {
            name: "guest".into(),
            vcpus: 1,
            memory_bytes: 32 << 20,
            image: Some(Image::Builtin("cairn-guest".into())),
            ..Default::default()
        }),
    )
    .await;
    drop(client);
    drop(node);

    // The node converted the file once; nothing is left in the previous format.
    assert_eq!(Records::open(&records).unwrap().converted_on_open(), 0);
}
