//! Generates the gRPC code from proto/ at the repository root, with protoc from
//! `protoc-bin-vendored` (no system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script reused from a shared target directory by a clone
    // elsewhere must look in this clone, not where it was first compiled.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("descriptor.bin"))
        .compile_with_config(
            config,
            &[
                root.join("leadscore/v1/lookup.proto"),
                root.join("inference/grpc_predict_v2.proto"),
            ],
            std::slice::from_ref(&root),
        )?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
