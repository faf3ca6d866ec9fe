//! Compiles the crate's .proto files without `protoc`: `protox` parses them into a
//! FileDescriptorSet in pure Rust, and `tonic-prost-build` turns that into prost
//! messages plus tonic clients and servers in OUT_DIR.

use std::error::Error;

/// Every file we generate code for; imports among them are resolved from `proto/`,
/// google.protobuf well-known types come built into protox and map to prost-types.
const PROTOS: &[&str] = &[
    "proto/istio/workload.proto",
    "proto/istio/authorization.proto",
    "proto/istio/zds.proto",
    "proto/istio/ca.proto",
    "proto/ambit/waypoint.proto",
    "proto/envoy/config/core/v3/base.proto",
    "proto/envoy/service/discovery/v3/discovery.proto",
    "proto/google/rpc/status.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");

    let descriptors = protox::compile(PROTOS, ["proto"])?;

    let mut config = tonic_prost_build::Config::new();
    // prost::Name on every message, with the type URL prefix xDS uses for Any.
    config
        .enable_type_names()
        .type_name_domain(["."], "type.googleapis.com");

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds_with_config(descriptors, config)?;
    Ok(())
}
