//! The records' versions: what this build writes, what the previous version wrote (format
//! 1, prost), and what a newer node writes.

use proto::v1;
use redb::{Database, ReadableDatabase, TableDefinition};

use super::legacy::{LegacyRequestRecord, LegacyVmRecord, LegacyVolumeRecord};
use super::*;

const META_TABLE: TableDefinition<&str, u64> = TableDefinition::new("meta");

fn raw(name: &'static str) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

fn kernel_vm() -> v1::CreateVm {
    v1::CreateVm {
        name: "web-1".into(),
        vcpus: 2,
        memory_bytes: 256 << 20,
        image: Some(v1::create_vm::Image::Kernel(v1::KernelImage {
            kernel_path: "/boot/vmlinuz".into(),
            initrd_path: String::new(),
            cmdline: "console=ttyS0".into(),
        })),
        volumes: vec!["web-1-root".into()],
        tenant: "finance".into(),
        nics: vec![v1::VmNic {
            network: "front".into(),
            mtu: 0,
            ipv4: "10.0.0.2".into(),
        }],
        sla: String::new(),
        priority: 0,
        dedicated_cpus: false,
    }
}

fn lab_2() -> v1::Peer {
    v1::Peer {
        name: "lab-2".into(),
        address: "127.0.0.92:7100".into(),
        public_key_hex: "ab".repeat(32),
    }
}

fn bond() -> v1::ApplyBond {
    v1::ApplyBond {
        name: "bond0".into(),
        mode: "active-backup".into(),
        members: vec!["eth0".into(), "eth1".into()],
        mtu: 9000,
        traffic: vec![v1::TrafficClass {
            name: "storage".into(),
            min_bps: 300_000_000,
            max_bps: 0,
            weight: 4,
        }],
        capacity_bps: 0,
        miimon_ms: 0,
    }
}

/// Writes `node.redb` as the previous version (format 1) left it: the tables its
/// `Store::open` made, prost records, no `meta` table.
fn write_format_1(path: &std::path::Path) {
    let database = Database::create(path).unwrap();
    let transaction = database.begin_write().unwrap();
    {
        let put = |table: &'static str, key: &str, bytes: Vec<u8>| {
            transaction
                .open_table(raw(table))
                .unwrap()
                .insert(key, bytes.as_slice())
                .unwrap();
        };
        put(
            "requests",
            "plan-1/1",
            prost::Message::encode_to_vec(&LegacyRequestRecord {
                action_digest: vec![7; 32],
                response: vec![1, 2, 3],
                recorded_at_unix_ms: 1_700_000_000_000,
            }),
        );
        put(
            "volumes",
            "data",
            prost::Message::encode_to_vec(&LegacyVolumeRecord {
                name: "data".into(),
                role: v1::VolumeRole::Primary as i32,
                size_bytes: 8 << 20,
                stripe_width: 2,
                stripe_unit_bytes: 64 << 10,
                replica_peers: vec![lab_2()],
                primary: String::new(),
                primary_key_hex: String::new(),
                copies: Vec::new(),
            }),
        );
        put(
            "vms",
            "web-1",
            prost::Message::encode_to_vec(&LegacyVmRecord {
                definition: Some(kernel_vm()),
                desired_running: true,
                last_pid: 4242,
            }),
        );
        put("bonds", "bond0", prost::Message::encode_to_vec(&bond()));
        put("peers", "lab-2", prost::Message::encode_to_vec(&lab_2()));
        transaction
            .open_table(raw("write_intents"))
            .unwrap()
            .insert("data", 9u64.to_le_bytes().as_slice())
            .unwrap();
        transaction
            .open_table(TableDefinition::<&str, u64>::new("counters"))
            .unwrap()
            .insert("volume-generation/data", 1)
            .unwrap();
        transaction
            .open_table(TableDefinition::<&[u8], u64>::new("nonces"))
            .unwrap();
    }
    transaction.commit().unwrap();
}

fn format_of(path: &std::path::Path) -> Option<u64> {
    let database = Database::create(path).unwrap();
    let transaction = database.begin_read().unwrap();
    let table = transaction.open_table(META_TABLE).ok()?;
    table.get("format").unwrap().map(|value| value.value())
}

fn stored_bytes(path: &std::path::Path, table: &'static str, key: &str) -> Vec<u8> {
    let database = Database::create(path).unwrap();
    let transaction = database.begin_read().unwrap();
    let table = transaction.open_table(raw(table)).unwrap();
    table.get(key).unwrap().unwrap().value().to_vec()
}

fn check_everything_kept(records: &Records) {
    let vms = records.list::<VmRecord>().unwrap();
    assert_eq!(vms.len(), 1);
    let (name, vm) = &vms[0];
    assert_eq!(name, "web-1");
    assert_eq!(vm.version, VmRecord::VERSION);
    assert!(vm.desired_running);
    assert_eq!(vm.last_pid, 4242);
    assert_eq!(
        vm.definition.clone().map(create_vm),
        Some(kernel_vm()),
        "the definition reads back as the CreateVm it was"
    );

    let volumes = records.list::<VolumeRecord>().unwrap();
    assert_eq!(
        volumes,
        vec![(
            "data".to_string(),
            VolumeRecord {
                version: VolumeRecord::VERSION,
                name: "data".into(),
                role: VolumeRole::Primary,
                size_bytes: 8 << 20,
                stripe_width: 2,
                stripe_unit_bytes: 64 << 10,
                replica_peers: vec![peer(&lab_2())],
                primary: String::new(),
                primary_key_hex: String::new(),
                copies: Vec::new(),
            }
        )]
    );

    let bonds = records.list::<BondRecord>().unwrap();
    assert_eq!(apply_bond(&bonds[0].1), bond());
    let peers = records.list::<PeerRecord>().unwrap();
    assert_eq!(wire_peer(&peers[0].1.peer), lab_2());

    let request = records.request("plan-1/1").unwrap().unwrap();
    assert_eq!(
        request,
        RequestRecord::new(vec![7; 32], vec![1, 2, 3], 1_700_000_000_000)
    );
    // Raw tables are untouched.
    assert_eq!(records.sequence_high_water("data").unwrap(), 9);
    assert_eq!(records.counter("volume-generation/data").unwrap(), 1);
}

#[test]
fn a_file_the_previous_version_wrote_is_converted_once_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    write_format_1(&path);
    assert_eq!(format_of(&path), None);

    let records = Records::open(&path).unwrap();
    assert_eq!(records.converted_on_open(), 5);
    check_everything_kept(&records);
    drop(records);

    assert_eq!(format_of(&path), Some(FORMAT));
    let vm = stored_bytes(&path, "vms", "web-1");
    assert!(
        vm.starts_with(br#"{"version":1,"#),
        "{}",
        String::from_utf8_lossy(&vm)
    );

    // Opened again: nothing left to convert, the same records.
    let records = Records::open(&path).unwrap();
    assert_eq!(records.converted_on_open(), 0);
    check_everything_kept(&records);
}

/// Bytes the previous version wrote (its prost `VmRecord` and `VolumeRecord`), spelled
/// out, so the compatibility decoder cannot drift from them unnoticed.
#[test]
fn bytes_of_the_previous_version_decode() {
    let previous_vm = LegacyVmRecord {
        definition: Some(v1::CreateVm {
            name: "vm-a".into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            image: Some(v1::create_vm::Image::Builtin("cairn-guest".into())),
            volumes: Vec::new(),
            tenant: "tenant-a".into(),
            nics: Vec::new(),
            sla: String::new(),
            priority: 0,
            dedicated_cpus: false,
        }),
        desired_running: true,
        last_pid: 11_412,
    };
    let encoded = prost::Message::encode_to_vec(&previous_vm);
    assert_eq!(proto::auth::to_hex(&encoded), PREVIOUS_VM_HEX);
    let record = legacy::vm(&hex(PREVIOUS_VM_HEX)).unwrap();
    assert_eq!(record.definition.map(create_vm), previous_vm.definition);
    assert!(record.desired_running);
    assert_eq!(record.last_pid, 11_412);

    let previous_volume = LegacyVolumeRecord {
        name: "v".into(),
        role: v1::VolumeRole::Replica as i32,
        size_bytes: 8 << 20,
        stripe_width: 2,
        stripe_unit_bytes: 65536,
        replica_peers: Vec::new(),
        primary: "lab-3".into(),
        primary_key_hex: "cd".repeat(32),
        copies: vec![v1::Peer {
            name: "lab-1".into(),
            address: String::new(),
            public_key_hex: "ef".repeat(32),
        }],
    };
    assert_eq!(
        proto::auth::to_hex(&prost::Message::encode_to_vec(&previous_volume)),
        PREVIOUS_VOLUME_HEX
    );
    let record = legacy::volume(&hex(PREVIOUS_VOLUME_HEX)).unwrap();
    assert_eq!(record.name, "v");
    assert_eq!(record.role, VolumeRole::Replica);
    assert_eq!(record.size_bytes, 8 << 20);
    assert_eq!((record.stripe_width, record.stripe_unit_bytes), (2, 65536));
    assert_eq!(record.primary, "lab-3");
    assert_eq!(record.copies[0].name, "lab-1");
}

const PREVIOUS_VM_HEX: &str =
    "0a240a04766d2d6110011880808020220b636169726e2d67756573743a0874656e616e742d611001189459";
const PREVIOUS_VOLUME_HEX: &str = concat!(
    "0a0176100218808080042002288080043a056c61622d334240636463646364636463646364636463",
    "64636463646364636463646364636463646364636463646364636463646364636463646364636463",
    "6463646364636463644a490a056c61622d311a406566656665666566656665666566656665666566",
    "65666566656665666566656665666566656665666566656665666566656665666566656665666566",
    "65666566",
);

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&text[at..at + 2], 16).unwrap())
        .collect()
}

#[test]
fn records_are_stored_as_json_with_their_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let records = Records::open(&path).unwrap();
    assert_eq!(records.converted_on_open(), 0);
    records
        .put("web-1", &vm_record(Some(&kernel_vm()), false, 0))
        .unwrap();
    records.put("lab-2", &peer_record(&lab_2())).unwrap();
    drop(records);
    assert_eq!(format_of(&path), Some(FORMAT));
    let value: serde_json::Value =
        serde_json::from_slice(&stored_bytes(&path, "vms", "web-1")).unwrap();
    assert_eq!(value["version"], 1);
    assert_eq!(
        value["definition"]["image"]["kernel"]["cmdline"],
        "console=ttyS0"
    );
    let value: serde_json::Value =
        serde_json::from_slice(&stored_bytes(&path, "peers", "lab-2")).unwrap();
    assert_eq!(value["version"], 1);
    assert_eq!(value["name"], "lab-2");
}

#[test]
fn a_record_of_a_newer_version_is_refused_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    drop(Records::open(&path).unwrap());
    {
        let database = Database::create(&path).unwrap();
        let transaction = database.begin_write().unwrap();
        transaction
            .open_table(raw("vms"))
            .unwrap()
            .insert(
                "web-1",
                br#"{"version":2,"definition":null,"desired_running":false,"last_pid":0,"spare":1}"#
                    .as_slice(),
            )
            .unwrap();
        transaction.commit().unwrap();
    }
    let records = Records::open(&path).unwrap();
    let error = records.list::<VmRecord>().unwrap_err();
    assert!(
        matches!(
            error,
            RecordsError::NewerRecord {
                table: "vms",
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        error.to_string().contains(
            "has version 2, written by a newer cairn-node; this one reads versions up to 1"
        ),
        "{error}"
    );
}

#[test]
fn a_file_of_a_newer_format_is_refused_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    drop(Records::open(&path).unwrap());
    {
        let database = Database::create(&path).unwrap();
        let transaction = database.begin_write().unwrap();
        transaction
            .open_table(META_TABLE)
            .unwrap()
            .insert("format", FORMAT + 1)
            .unwrap();
        transaction.commit().unwrap();
    }
    let message = Records::open(&path).unwrap_err().to_string();
    assert!(
        message.contains(
            "has format 3, written by a newer cairn-node; this one reads formats up to 2"
        ),
        "{message}"
    );
}

#[test]
fn a_corrupt_previous_record_stops_the_conversion_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    {
        let database = Database::create(&path).unwrap();
        let transaction = database.begin_write().unwrap();
        transaction
            .open_table(raw("volumes"))
            .unwrap()
            .insert("v", [0xff, 0xff, 0xff].as_slice())
            .unwrap();
        transaction.commit().unwrap();
    }
    let message = Records::open(&path).unwrap_err().to_string();
    assert!(
        message.contains("node record `v` in table `volumes` is corrupt"),
        "{message}"
    );
    // Nothing was converted or marked: the file is as it was.
    assert_eq!(format_of(&path), None);
}

/// Request records and nonces stored by many threads at once share commits (group
/// commit) and every one is there afterwards, readable after the file is reopened.
#[test]
fn request_records_and_nonces_stored_together_are_each_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let records = Records::open(&path).unwrap();
    std::thread::scope(|scope| {
        for thread in 0..8u8 {
            let records = &records;
            scope.spawn(move || {
                for i in 0..25u8 {
                    let id = format!("r-{thread}-{i}");
                    let record = RequestRecord::new(vec![thread; 32], vec![i], 1_700_000_000_000);
                    records.put_request(&id, &record).unwrap();
                    records
                        .put_nonce(
                            &[thread, i, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                            u64::MAX,
                        )
                        .unwrap();
                }
            });
        }
    });
    drop(records);
    let records = Records::open(&path).unwrap();
    assert_eq!(records.request_count().unwrap(), 200);
    assert_eq!(records.live_nonces(0).unwrap().len(), 200);
    let record = records.request("r-7-24").unwrap().expect("recorded");
    assert_eq!(
        (record.action_digest, record.response),
        (vec![7; 32], vec![24])
    );
}
