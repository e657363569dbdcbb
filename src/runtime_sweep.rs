//! `duo bench-runtime --contexts`: what one target forward costs as the
//! context grows, on the model's device, measured the way
//! `scripts/ort_iobinding_loop.py` measures a plain Python onnxruntime
//! IOBinding loop (same fixed past, same new-token blocks, all their logits
//! rows delivered to the host), so the two can be compared as ratios; plus
//! the host bytes each step moves and what the cache edits cost.

use std::time::Instant;

use duo_core::runtime::CausalLm;
use serde_json::{Value, json};

/// Untimed forwards before each measured series.
const WARMUP: usize = 3;
/// The token fed everywhere (any id of the vocabulary would do).
const FILL_TOKEN: u32 = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn ms<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed().as_secs_f64() * 1e3)
}

/// For every context in `contexts`: ms per forward of each block size in
/// `blocks` (median of `reps`, [`crate::bench::forward_ms`]) on a past of
/// that length. Host bytes per step and cache-edit costs are measured at
/// the largest context.
pub fn sweep(
    lm: &mut CausalLm,
    contexts: &[usize],
    blocks: &[usize],
    reps: usize,
) -> anyhow::Result<Value> {
    let mut by_context = serde_json::Map::new();
    for &ctx in contexts {
        let mut row = serde_json::Map::new();
        for &n in blocks {
            let t = crate::bench::forward_ms(lm, ctx, n, WARMUP, reps)?;
            row.insert(format!("+{n}_ms"), json!(t));
        }
        by_context.insert(ctx.to_string(), Value::Object(row));
    }
    let largest = contexts.iter().copied().max().unwrap_or(0);
    let mut seq = lm.sequence()?;
    lm.extend_last(&mut seq, &vec![FILL_TOKEN; largest.max(1)], 1)?;
    let past = seq.len();
    let mut host = serde_json::Map::new();
    for &n in blocks {
        let before = lm.host_traffic();
        lm.extend(&mut seq, &vec![FILL_TOKEN; n])?;
        let after = lm.host_traffic();
        seq.truncate(past)?;
        host.insert(
            format!("+{n}"),
            json!({
                "to_device": after.to_device_bytes - before.to_device_bytes,
                "to_host": after.to_host_bytes - before.to_host_bytes,
            }),
        );
    }
    let edits = edit_costs(lm, &mut seq, past, reps)?;
    let info = lm.info();
    Ok(json!({
        "model": info.path,
        "provider": info.provider,
        "kv_dtype": format!("{:?}", info.kv_dtype),
        "contexts": by_context,
        "host_bytes_per_step": host,
        "edit_ms": edits,
    }))
}

/// Medians of the three cache edits at context `ctx`: rolling back an
/// 8-token block, forking 4 branches, keeping one of them.
fn edit_costs(
    lm: &mut CausalLm,
    seq: &mut duo_core::runtime::Sequence,
    ctx: usize,
    reps: usize,
) -> anyhow::Result<Value> {
    let (mut rollback, mut fork, mut keep) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        lm.extend(seq, &[FILL_TOKEN; 8])?;
        let (res, t) = ms(|| seq.truncate(ctx));
        res?;
        rollback.push(t);
        let (br, t) = ms(|| seq.fork(4));
        fork.push(t);
        let br = br?;
        let (kept, t) = ms(|| br.keep(2, 0));
        keep.push(t);
        kept?;
    }
    Ok(json!({
        "rollback_8": median(rollback),
        "fork_4": median(fork),
        "keep_1_of_4": median(keep),
    }))
}
