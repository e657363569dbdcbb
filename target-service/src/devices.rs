//! Which devices this worker sees, for Info and health. With the `cuda`
//! feature, `cudarc` asks the CUDA driver (guarded: a machine without the
//! driver never panics, it reports the GPU as missing).

use duo_core::runtime::Device;

/// Device descriptions, or an error naming what is missing for `device`.
pub fn describe(device: Device) -> Result<Vec<String>, String> {
    let mut out = vec!["cpu".to_string()];
    match device {
        Device::Cpu => {
            out.extend(gpus().unwrap_or_default());
            Ok(out)
        }
        Device::Cuda(n) => {
            let gpus = gpus()?;
            let Some(g) = usize::try_from(n).ok().and_then(|i| gpus.get(i)) else {
                return Err(format!(
                    "--device cuda:{n} requested but {} CUDA device(s) were found",
                    gpus.len()
                ));
            };
            out.push(g.clone());
            Ok(out)
        }
    }
}

#[cfg(feature = "cuda")]
fn gpus() -> Result<Vec<String>, String> {
    use cudarc::driver::{CudaContext, result, sys};
    // SAFETY: only checks whether the driver library can be loaded.
    if !unsafe { sys::is_culib_present() } {
        return Err(
            "no CUDA driver (libcuda.so) found: install the NVIDIA driver or use --device cpu"
                .into(),
        );
    }
    result::init().map_err(|e| format!("CUDA driver init failed: {e}"))?;
    let n = CudaContext::device_count().map_err(|e| format!("counting CUDA devices: {e}"))?;
    let mut out = Vec::new();
    for i in 0..n {
        let ctx =
            CudaContext::new(i as usize).map_err(|e| format!("opening CUDA device {i}: {e}"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let mem = ctx.total_mem().unwrap_or(0);
        out.push(format!(
            "cuda:{i} {name} ({:.1} GiB)",
            mem as f64 / (1u64 << 30) as f64
        ));
    }
    Ok(out)
}

/// Free memory on CUDA device `ordinal`, in bytes.
#[cfg(feature = "cuda")]
pub fn free_memory(ordinal: i32) -> Result<u64, String> {
    use cudarc::driver::{CudaContext, sys};
    // SAFETY: only checks whether the driver library can be loaded.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver (libcuda.so) found".into());
    }
    let ctx = CudaContext::new(usize::try_from(ordinal).map_err(|e| e.to_string())?)
        .map_err(|e| format!("opening CUDA device {ordinal}: {e}"))?;
    let (free, _total) = ctx
        .mem_get_info()
        .map_err(|e| format!("reading CUDA device {ordinal}'s memory: {e}"))?;
    Ok(free as u64)
}

/// Free memory on a CUDA device: unknown without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub fn free_memory(_ordinal: i32) -> Result<u64, String> {
    gpus().map(|_| 0)
}

#[cfg(not(feature = "cuda"))]
fn gpus() -> Result<Vec<String>, String> {
    Err("this target-service was built without the `cuda` feature: rebuild with `cargo build --release -p target-service --features cuda`".into())
}
