//! Generates the ONNX protobuf types (`proto/onnx.proto`, used to build the
//! gpu-like stand-in models), and makes sure the ONNX Runtime shared library
//! exists before anything runs:
//! when `ORT_DYLIB_PATH` (set by `.cargo/config.toml`) points at a missing
//! file under the repository's `.ort/`, run `scripts/fetch-onnxruntime.sh`.
//! A failure is reported as a warning, not a build error: the library may
//! still be provided later through `ORT_DYLIB_PATH` or `--ort-lib`.
use std::path::Path;
use std::process::Command;

fn main() {
    onnx_protos();
    fetch_onnxruntime();
}

fn onnx_protos() {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    prost_build::compile_protos(&["proto/onnx.proto"], &["proto"]).expect("compiling onnx.proto");
}

fn fetch_onnxruntime() {
    println!("cargo:rerun-if-env-changed=ORT_DYLIB_PATH");
    let Ok(lib) = std::env::var("ORT_DYLIB_PATH") else {
        return;
    };
    println!("cargo:rerun-if-changed={lib}");
    let lib = Path::new(&lib);
    if lib.exists() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("scripts/fetch-onnxruntime.sh");
    let dest = lib.parent().unwrap_or(Path::new("."));
    if !script.exists() || dest.file_name() != Some(std::ffi::OsStr::new(".ort")) {
        return;
    }
    match Command::new("bash").arg(&script).arg(dest).status() {
        Ok(s) if s.success() => {}
        _ => println!(
            "cargo:warning=could not fetch ONNX Runtime into {}; run scripts/fetch-onnxruntime.sh or set ORT_DYLIB_PATH",
            dest.display()
        ),
    }
}
