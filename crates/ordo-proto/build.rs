//! Compiles `proto/` with a vendored `protoc`, so building needs no system protoc.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let files = [root.join("ordo/v1/ordo.proto"), root.join("ordo/v1/operation.proto")];
    println!("cargo:rerun-if-changed={}", root.display());

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("ordo_descriptor.bin"))
        .bytes(".ordo.v1.Event.payload")
        .bytes(".ordo.v1.EventResult.payload")
        .bytes(".ordo.v1.InvokeRequest.payload")
        .bytes(".ordo.v1.InvokeResponse.payload")
        .compile_with_config(config, &files, &[root])?;
    Ok(())
}
