//! Generates the Rust types and tonic services for `ringfeed.v1`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["ringfeed/v1/router.proto", "ringfeed/v1/node.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("ringfeed_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    // The router's reflection lists the public service alone: a descriptor set of
    // router.proto only (the code generated beside it is not used).
    let router_only = out_dir.join("router_only");
    std::fs::create_dir_all(&router_only)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .out_dir(&router_only)
        .file_descriptor_set_path(out_dir.join("ringfeed_router_descriptor.bin"))
        .compile_protos(&[protos[0]], &["."])?;
    Ok(())
}
