//! Compiles `schemas/proto/cairn/node/v1/*.proto` with protox (a pure-Rust protobuf
//! compiler, so no system `protoc` is needed) and generates prost messages plus tonic
//! clients and servers. The encoded file descriptor set is written next to the
//! generated code so the node can serve gRPC reflection from it.

use std::path::PathBuf;

const FILES: &[&str] = &[
    "cairn/node/v1/common.proto",
    "cairn/node/v1/inventory.proto",
    "cairn/node/v1/observe.proto",
    "cairn/node/v1/apply.proto",
    "cairn/node/v1/watch.proto",
    "cairn/node/v1/replication.proto",
    "cairn/node/v1/lease.proto",
    "cairn/node/v1/witness.proto",
    "cairn/node/v1/enroll.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let include = manifest_dir.join("../schemas/proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    for file in FILES {
        println!("cargo:rerun-if-changed={}", include.join(file).display());
    }

    let file_descriptor_set = protox::compile(FILES, [&include])?;
    let encoded = prost::Message::encode_to_vec(&file_descriptor_set);
    std::fs::write(out_dir.join("cairn_node_v1_descriptor.bin"), encoded)?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // BTreeMap keeps map encoding deterministic, which request signing relies on.
        .btree_map(".")
        .compile_fds(file_descriptor_set)?;
    Ok(())
}
