//! Compiles the echo workload's .proto files without `protoc` (protox parses them in Rust), the
//! same way `crates/proto` does: prost messages and tonic servers and clients in OUT_DIR.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["proto/echo.proto", "proto/health.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
