//! The causal-LM runtime against the bundled models and the pipeline's
//! PyTorch fixtures (real ONNX Runtime, no Python needed).

use std::path::{Path, PathBuf};

use duo_core::runtime::{CausalLm, ModelOptions, RuntimeError};

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn load(name: &str) -> CausalLm {
    CausalLm::load(&models().join(name), &ModelOptions::default()).expect("bundled model loads")
}

#[derive(serde::Deserialize)]
struct Fixture {
    vocab_size: usize,
    eos_token_id: u32,
    tolerance: f32,
    cases: Vec<Case>,
    greedy: Vec<Greedy>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    past: Vec<u32>,
    input: Vec<u32>,
    top_ids: Vec<Vec<u32>>,
    top_values: Vec<Vec<f32>>,
}

#[derive(serde::Deserialize)]
struct Greedy {
    ids: Vec<u32>,
    greedy: Vec<u32>,
    top2_gap: Vec<f32>,
}

fn fixture(name: &str) -> Fixture {
    let text = std::fs::read_to_string(models().join(format!("fixtures/{name}.json")))
        .expect("fixture exists");
    serde_json::from_str(&text).expect("fixture parses")
}

fn argmax(row: &[f32]) -> u32 {
    duo_core::sampling::argmax(row)
}

/// Prefill, single steps and 3/8-token blocks on a past match PyTorch.
#[test]
fn parity_with_pytorch_fixtures() {
    for name in ["target", "draft"] {
        let fx = fixture(name);
        let mut lm = load(name);
        assert_eq!(lm.info().vocab_size, fx.vocab_size);
        assert_eq!(lm.info().eos_token_id, Some(fx.eos_token_id));
        let mut worst = 0f32;
        for case in &fx.cases {
            let mut seq = lm.sequence().unwrap();
            if !case.past.is_empty() {
                lm.extend(&mut seq, &case.past).unwrap();
            }
            let logits = lm.extend(&mut seq, &case.input).unwrap();
            assert_eq!(logits.rows(), case.input.len(), "{name}/{}", case.name);
            for (pos, (ids, vals)) in case.top_ids.iter().zip(&case.top_values).enumerate() {
                let row = logits.row(pos);
                for (&id, &want) in ids.iter().zip(vals) {
                    let diff = (row[id as usize] - want).abs();
                    worst = worst.max(diff);
                    assert!(
                        diff <= fx.tolerance,
                        "{name}/{} position {pos} token {id}: {} vs {want}",
                        case.name,
                        row[id as usize]
                    );
                }
                assert_eq!(
                    argmax(row),
                    ids[0],
                    "{name}/{} position {pos}: argmax",
                    case.name
                );
            }
        }
        eprintln!("{name}: worst |logit diff| vs PyTorch {worst:.2e}");
    }
}

/// Greedy decoding step by step reproduces PyTorch's greedy continuation
/// (a divergence is tolerated only at a near-tie, gap < `NEAR_TIE_GAP`).
#[test]
fn greedy_continuation_matches_pytorch() {
    for name in ["target", "draft"] {
        let fx = fixture(name);
        let mut lm = load(name);
        for g in &fx.greedy {
            let mut seq = lm.sequence().unwrap();
            let mut logits = lm.extend(&mut seq, &g.ids).unwrap();
            for (i, &want) in g.greedy.iter().enumerate() {
                let got = argmax(logits.last());
                if got != want {
                    assert!(
                        g.top2_gap[i] < duo_core::speculative::verify::NEAR_TIE_GAP,
                        "{name}: diverged at step {i} with gap {}",
                        g.top2_gap[i]
                    );
                    break;
                }
                logits = lm.extend(&mut seq, &[got]).unwrap();
            }
        }
    }
}

fn decode_greedy(
    lm: &mut CausalLm,
    seq: &mut duo_core::runtime::Sequence,
    first: &[f32],
    n: usize,
) -> Vec<u32> {
    let mut out = Vec::new();
    let mut next = argmax(first);
    for _ in 0..n {
        out.push(next);
        let l = lm.extend(seq, &[next]).unwrap();
        next = argmax(l.last());
    }
    out
}

fn prompt(lm: &CausalLm) -> Vec<u32> {
    let _ = lm;
    fixture("target").greedy[0].ids.clone()
}

/// Rolling back then extending gives the same logits as straight decoding.
#[test]
fn truncate_then_extend_equals_straight_decoding() {
    let mut lm = load("target");
    let p = prompt(&lm);
    let mut straight = lm.sequence().unwrap();
    let l = lm.extend(&mut straight, &p).unwrap();
    let cont = decode_greedy(&mut lm, &mut straight, l.last(), 12);

    let mut rolled = lm.sequence().unwrap();
    lm.extend(&mut rolled, &p).unwrap();
    lm.extend(&mut rolled, &[7, 8, 9, 10, 11]).unwrap(); // a wrong guess...
    rolled.truncate(p.len() - 1).unwrap(); // ...rolled back past it
    assert_eq!(rolled.len(), p.len() - 1);
    let l = lm.extend(&mut rolled, &p[p.len() - 1..]).unwrap();
    let again = decode_greedy(&mut lm, &mut rolled, l.last(), 12);
    assert_eq!(cont, again);
    assert_eq!(rolled.tokens(), straight.tokens());
}

/// Branches: batched branch steps equal sequential decoding of each branch,
/// and keeping one branch equals decoding it fresh.
#[test]
fn branches_equal_sequential_and_fresh() {
    let mut lm = load("draft");
    let p = prompt(&lm);
    let mut base = lm.sequence().unwrap();
    let l = lm.extend(&mut base, &p).unwrap();
    let mut order: Vec<u32> = (0..lm.info().vocab_size as u32).collect();
    let row = l.last().to_vec();
    order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
    let heads = &order[..3];

    // Batched: three branches, four greedy steps each.
    let mut br = base.fork(3).unwrap();
    let mut toks = heads.to_vec();
    let mut batched_logits = Vec::new();
    for _ in 0..4 {
        let l = lm.extend_branches(&mut br, &toks).unwrap();
        assert_eq!(l.rows(), 3);
        batched_logits.push(l.clone());
        toks = (0..3).map(|j| argmax(l.row(j))).collect();
    }
    // Sequential: each branch alone from a copy of the base.
    for (j, &h) in heads.iter().enumerate() {
        let mut seq = lm.sequence().unwrap();
        lm.extend(&mut seq, &p).unwrap();
        let mut t = h;
        for (step, bl) in batched_logits.iter().enumerate() {
            let l = lm.extend(&mut seq, &[t]).unwrap();
            let max_diff = l
                .last()
                .iter()
                .zip(bl.row(j))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                max_diff < 1e-4,
                "branch {j} step {step}: batched vs sequential differ by {max_diff}"
            );
            t = argmax(l.last());
        }
        assert_eq!(seq.tokens()[p.len()..], br.branch(j)[..]);
    }
    // Keep branch 1 (first 3 own tokens), continue, compare with fresh decoding.
    let kept_tokens = br.branch(1)[..3].to_vec();
    let mut kept = br.keep(1, 3).unwrap();
    assert_eq!(kept.len(), p.len() + 3);
    let l = lm.extend(&mut kept, &[5]).unwrap();
    let mut fresh = lm.sequence().unwrap();
    let mut ctx = p.clone();
    ctx.extend_from_slice(&kept_tokens);
    ctx.push(5);
    let f = lm.extend(&mut fresh, &ctx).unwrap();
    let max_diff = l
        .last()
        .iter()
        .zip(f.last())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_diff < 1e-4, "kept branch vs fresh: {max_diff}");
}

/// The bundled target uses grouped-query attention; discovery finds it.
#[test]
fn discovers_gqa_shape_from_graph() {
    let lm = load("target");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(models().join("target/config.json")).unwrap(),
    )
    .unwrap();
    let info = lm.info();
    assert_eq!(
        info.kv_heads as u64,
        cfg["num_key_value_heads"].as_u64().unwrap()
    );
    assert!(
        info.kv_heads < cfg["num_attention_heads"].as_u64().unwrap() as usize,
        "target must use GQA"
    );
    assert_eq!(
        info.num_layers as u64,
        cfg["num_hidden_layers"].as_u64().unwrap()
    );
    assert_eq!(info.head_dim as u64, cfg["head_dim"].as_u64().unwrap());
    assert_eq!(
        info.context_len,
        cfg["max_position_embeddings"].as_u64().map(|v| v as usize)
    );
    assert!(info.has_position_ids);
    assert_eq!(info.provider, "CPU");
}

#[test]
fn incompatible_and_missing_models_get_clear_errors() {
    let err = CausalLm::load(
        &models().join("fixtures/not_a_causal_lm.onnx"),
        &ModelOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, RuntimeError::Incompatible { .. }), "{err}");
    assert!(err.to_string().contains("attention_mask"), "{err}");
    let err =
        CausalLm::load(Path::new("/nonexistent/model"), &ModelOptions::default()).unwrap_err();
    assert!(matches!(err, RuntimeError::ModelMissing(_)), "{err}");
}

#[test]
fn bad_calls_are_errors_not_panics() {
    let mut lm = load("draft");
    let mut seq = lm.sequence().unwrap();
    assert!(lm.extend(&mut seq, &[]).is_err());
    assert!(lm.extend(&mut seq, &[u32::MAX]).is_err());
    assert!(
        seq.is_empty(),
        "a failed call leaves the sequence unchanged"
    );
    let ctx = lm.info().context_len.unwrap();
    assert!(lm.extend(&mut seq, &vec![1; ctx + 1]).is_err());
    assert!(seq.fork(0).is_err());
}
