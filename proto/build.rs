//! Generates the gRPC code of `proto/capsnet/v1/*.proto` (never edited by hand). protoc comes
//! from the `protoc-bin-vendored` crate, so no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // Payloads as `bytes::Bytes`: received chunks are slices of the transport buffer, not copies.
    config.bytes([".capsnet.v1"]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["capsnet/v1/capsnet.proto"],
        &["."],
    )?;
    println!("cargo:rerun-if-changed=capsnet/v1/capsnet.proto");
    Ok(())
}
