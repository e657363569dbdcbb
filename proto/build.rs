//! Generates the duo.v1 code and the descriptor set for server reflection.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("duo_descriptor.bin"))
        .compile_protos(&["duo/v1/duo.proto"], &["."])?;
    println!("cargo:rerun-if-changed=duo/v1/duo.proto");
    Ok(())
}
