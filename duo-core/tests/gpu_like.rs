//! The gpu-like stand-ins decode exactly like the bundled pair: built from
//! the bundled models into a temporary folder, they give the same logits,
//! bit for bit, for a prefill, a verification block, single steps and
//! batched branches; and their ballast really costs (a forward of the
//! stand-in target takes longer than the original's).

use std::path::{Path, PathBuf};

use duo_core::gpu_like::{self, Ballast};
use duo_core::runtime::{CausalLm, Logits, ModelOptions};

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn load(path: &Path) -> CausalLm {
    CausalLm::load(path, &ModelOptions::default()).expect("model loads")
}

fn bits(l: &Logits) -> Vec<Vec<u32>> {
    (0..l.rows())
        .map(|r| l.row(r).iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// Runs the same calls on both models, asserting equal logit bits each time.
fn assert_same_logits(a: &mut CausalLm, b: &mut CausalLm, what: &str) {
    let prompt: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 2000).collect();
    let (mut sa, mut sb) = (a.sequence().unwrap(), b.sequence().unwrap());
    let check = |x: &Logits, y: &Logits, step: &str| {
        assert_eq!(bits(x), bits(y), "{what}: logits differ at {step}");
    };
    check(
        &a.extend(&mut sa, &prompt).unwrap(),
        &b.extend(&mut sb, &prompt).unwrap(),
        "prefill",
    );
    for t in [5u32, 900, 1500] {
        check(
            &a.extend(&mut sa, &[t]).unwrap(),
            &b.extend(&mut sb, &[t]).unwrap(),
            "a step",
        );
    }
    let block: Vec<u32> = (0..8).map(|i| 100 + i * 3).collect();
    check(
        &a.extend(&mut sa, &block).unwrap(),
        &b.extend(&mut sb, &block).unwrap(),
        "an 8-token block",
    );
    sa.truncate(43).unwrap();
    sb.truncate(43).unwrap();
    let (mut ba, mut bb) = (sa.fork(3).unwrap(), sb.fork(3).unwrap());
    for step in 0..2u32 {
        let toks = [7 + step, 70 + step, 700 + step];
        check(
            &a.extend_branches(&mut ba, &toks).unwrap(),
            &b.extend_branches(&mut bb, &toks).unwrap(),
            "batched branches",
        );
    }
}

fn median_ms(lm: &mut CausalLm, tokens: usize) -> f64 {
    let mut seq = lm.sequence().unwrap();
    lm.extend(&mut seq, &[1; 64]).unwrap();
    let mut times: Vec<f64> = (0..7)
        .map(|_| {
            let t = std::time::Instant::now();
            lm.extend(&mut seq, &vec![2; tokens]).unwrap();
            seq.truncate(64).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

#[test]
fn stand_ins_give_the_trained_models_logits_bit_for_bit() {
    let cache = std::env::temp_dir().join(format!("duo-gpu-like-test-{}", std::process::id()));
    let pair = gpu_like::gpu_like_pair(&models().join("target"), &models().join("draft"), &cache)
        .expect("stand-ins build");
    assert!(pair.built);
    // A second call reuses the cache.
    assert!(
        !gpu_like::gpu_like_pair(&models().join("target"), &models().join("draft"), &cache)
            .unwrap()
            .built
    );
    for (name, path) in [("target", &pair.target), ("draft", &pair.draft)] {
        let mut original = load(&models().join(name));
        let mut stand_in = load(path);
        assert_eq!(original.info().vocab_size, stand_in.info().vocab_size);
        assert_eq!(original.info().context_len, stand_in.info().context_len);
        assert_same_logits(&mut original, &mut stand_in, name);
        if name == "target" {
            // The ballast is not folded away: it costs on every forward.
            let (o, s) = (median_ms(&mut original, 1), median_ms(&mut stand_in, 1));
            assert!(
                s > o,
                "stand-in target {s:.2} ms per step, original {o:.2} ms"
            );
        }
    }
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn a_model_cannot_get_two_ballasts() {
    let path = models().join("draft/model.onnx");
    let bytes = std::fs::read(&path).unwrap();
    let b = Ballast::PerToken {
        width: 8,
        layers: 1,
    };
    let once = gpu_like::add_ballast(&bytes, &path, b).unwrap();
    let err = gpu_like::add_ballast(&once, &path, b).unwrap_err();
    assert!(err.to_string().contains("already has a ballast"), "{err}");
    let err = gpu_like::add_ballast(b"not a model", &path, b).unwrap_err();
    assert!(err.to_string().contains("not an ONNX model"), "{err}");
}
