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
    Ok(())
}
