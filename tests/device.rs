//! What a GPU target runs, proven on CPU:
//! - the fp16 export of the bundled target (made by `models/onnx_llama.py`
//!   from the weights of its torch export, read back bit for bit: fp16 weights, KV cache and logits, fp16
//!   arithmetic) runs through the same runtime, with its cache edits, and
//!   decodes like the fp32 model up to fp16 near-ties;
//! - `scripts/gpu-check.sh --cpu`, the one-shot GPU check in its CPU mode.
//!
//! Both need a Python with `onnx` and `numpy` (`models/requirements-onnx.txt`;
//! the GPU check also `onnxruntime`): `DUO_PYTHON`, else `python3`. Without
//! them the tests are skipped, unless DUO_REQUIRE_ONNX_PYTHON=1 (as in CI).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use duo_core::runtime::{CausalLm, ModelOptions, model::KvDType};
use duo_core::sampling::argmax;

use duo_core::speculative::verify::FP16_NEAR_TIE_GAP;

fn python(modules: &str) -> Option<String> {
    let python = std::env::var("DUO_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    assert!(
        std::env::var("DUO_REQUIRE_ONNX_PYTHON").is_err(),
        "`{python} -c 'import {modules}'` failed: pip install -r models/requirements-onnx.txt"
    );
    eprintln!("skipped: Python lacks {modules} (pip install -r models/requirements-onnx.txt)");
    None
}

fn fp16_target(python: &str) -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("target-f16");
    let m = common::models();
    let status = Command::new(python)
        .arg(m.join("onnx_llama.py"))
        .arg("--weights")
        .arg(m.join("target/model.onnx"))
        .args(["--dtype", "f16", "--out"])
        .arg(&out)
        .status()
        .expect("python runs");
    assert!(status.success(), "models/onnx_llama.py failed");
    out
}

fn greedy(lm: &mut CausalLm, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut seq = lm.sequence().unwrap();
    let mut row = lm.extend_last(&mut seq, prompt, 1).unwrap().last().to_vec();
    let (mut out, mut rows) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = argmax(&row);
        out.push(t);
        rows.push(row);
        row = lm.extend(&mut seq, &[t]).unwrap().last().to_vec();
    }
    (out, rows)
}

fn top2_gap(row: &[f32]) -> f32 {
    let mut r = row.to_vec();
    r.sort_unstable_by(|a, b| b.total_cmp(a));
    r[0] - r[1]
}

#[test]
fn fp16_target_runs_through_the_runtime_and_decodes_like_fp32() {
    let Some(python) = python("onnx, numpy") else {
        return;
    };
    let dir = fp16_target(&python);
    let opts = ModelOptions::default();
    let mut f16 = CausalLm::load(&dir, &opts).unwrap();
    let mut f32 = CausalLm::load(&common::models().join("target"), &opts).unwrap();
    assert_eq!(f16.info().kv_dtype, KvDType::F16);
    assert_eq!(f16.info().vocab_size, f32.info().vocab_size);

    let prompts: Vec<Vec<u32>> = common::spec_bench(2)
        .iter()
        .map(|p| common::encode(p).into_iter().take(48).collect())
        .collect();
    let (mut same, mut total, mut diverged) = (0, 0, 0);
    for p in &prompts {
        let (want, rows) = greedy(&mut f32, p, 32);
        let (got, _) = greedy(&mut f16, p, 32);
        total += want.len();
        same += want.iter().zip(&got).take_while(|(a, b)| a == b).count();
        if let Some(i) = want.iter().zip(&got).position(|(a, b)| a != b) {
            diverged += 1;
            let gap = top2_gap(&rows[i]);
            assert!(
                gap < FP16_NEAR_TIE_GAP,
                "fp16 left fp32 greedy at token {i} where fp32's top-2 gap is {gap} (not a near-tie)"
            );
        }
    }
    let agreement = same as f64 / total as f64;
    eprintln!(
        "fp16 vs fp32 greedy: {same}/{total} tokens before the first divergence ({agreement:.3}), {diverged}/{} prompts diverged (all at near-ties < {FP16_NEAR_TIE_GAP})",
        prompts.len()
    );

    // The cache edits work on fp16 caches: rollback equals never feeding.
    let p = &prompts[0];
    let mut fresh = f16.sequence().unwrap();
    f16.extend(&mut fresh, p).unwrap();
    let want = f16.extend(&mut fresh, &[42]).unwrap();
    let mut rolled = f16.sequence().unwrap();
    f16.extend(&mut rolled, p).unwrap();
    f16.extend(&mut rolled, &[5, 6, 7]).unwrap();
    rolled.truncate(p.len()).unwrap();
    let got = f16.extend(&mut rolled, &[42]).unwrap();
    assert_eq!(got.last(), want.last());
    let kept = rolled.fork(3).unwrap().keep(1, 0).unwrap();
    assert_eq!(kept.len(), p.len() + 1);
}

/// `scripts/gpu-check.sh --cpu`: the GPU check's every step (random target
/// and draft made on the spot, the Rust forward sweep, the Python IOBinding
/// reference on the same file, AR/SpS/Duo with greedy identity), small and
/// on CPU, so the script is ready for the first machine with a GPU.
#[test]
fn gpu_check_script_runs_in_cpu_mode() {
    let Some(python) = python("onnx, numpy, onnxruntime") else {
        return;
    };
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gpu-check");
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gpu-check-work");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new("bash")
        .arg(root.join("scripts/gpu-check.sh"))
        .arg("--cpu")
        .arg(&out)
        .env("DUO_BIN", env!("CARGO_BIN_EXE_duo"))
        .env("DUO_PYTHON", &python)
        .env("DUO_GPU_CHECK_WORK", &work)
        .env("RUST_LOG", "warn,ort=error")
        .status()
        .expect("bash runs");
    assert!(status.success(), "scripts/gpu-check.sh --cpu failed");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("gpu-check.json")).unwrap())
            .unwrap();
    assert_eq!(report["mode"], "cpu");
    assert_eq!(
        report["modes"]["headline"]["identical"], true,
        "modes diverged"
    );
    for ctx in ["128", "512"] {
        for block in ["+1_ms", "+8_ms"] {
            assert!(report["rust_runtime"]["contexts"][ctx][block].is_number());
            assert!(report["python_iobinding"]["contexts"][ctx][block].is_number());
            assert!(report["rust_over_python_ms"][ctx][block].is_number());
        }
    }
    // Only logits rows reach the host: one row of 32000 f32 per 1-token step.
    assert_eq!(
        report["rust_runtime"]["host_bytes_per_step"]["+1"]["to_host"],
        32000 * 4
    );
}
