//! Loading the ONNX Runtime shared library (ort's `load-dynamic`).
//!
//! The library is looked up, in order: an explicit path (a binary's
//! `--ort-lib` flag), the `ORT_DYLIB_PATH` environment variable at run time,
//! and the path `.cargo/config.toml` set at build time (the repository's
//! `.ort/`, filled by `scripts/fetch-onnxruntime.sh` from the PyPI wheel).
//! The first successful call fixes the library for the whole process.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::RuntimeError;

/// The process-wide ONNX Runtime environment.
pub type Environment = ort::environment::Environment;

static ENV: OnceLock<Result<(Environment, PathBuf), String>> = OnceLock::new();

/// Where the library would be loaded from, without loading it.
pub fn library_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return Some(PathBuf::from(p));
    }
    option_env!("ORT_DYLIB_PATH").map(PathBuf::from)
}

/// Loads ONNX Runtime (once per process) and returns its environment.
///
/// A later call with a different `explicit` path gets the already-loaded
/// library. Errors say what is missing and how to provide it.
pub fn init(explicit: Option<&Path>) -> Result<Environment, RuntimeError> {
    let res = ENV.get_or_init(|| {
        let Some(path) = library_path(explicit) else {
            return Err(missing_message(None));
        };
        if !path.exists() {
            return Err(missing_message(Some(&path)));
        }
        let builder = ort::init_from(&path).map_err(|e| {
            format!(
                "could not load ONNX Runtime from {}: {e}; it must be ONNX Runtime 1.31 (scripts/fetch-onnxruntime.sh fetches it)",
                path.display()
            )
        })?;
        let env = builder
            .with_name("duo")
            .build()
            .map_err(|e| format!("could not start ONNX Runtime: {e}"))?;
        tracing::info!(library = %path.display(), "ONNX Runtime loaded");
        Ok((env, path))
    });
    match res {
        Ok((env, _)) => Ok(env.clone()),
        Err(msg) => Err(RuntimeError::Library(msg.clone())),
    }
}

fn missing_message(path: Option<&Path>) -> String {
    let what = match path {
        Some(p) => format!("ONNX Runtime library not found at {}", p.display()),
        None => "ONNX Runtime library not configured".to_string(),
    };
    format!(
        "{what}: run scripts/fetch-onnxruntime.sh, or point ORT_DYLIB_PATH (or --ort-lib) at libonnxruntime.so 1.31 (the onnxruntime-gpu build for CUDA)"
    )
}
