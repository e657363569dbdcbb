//! The device-resident path on CPU: the same binding code a GPU runs (cache
//! bound where it lives, edits as on-device graphs, only the asked-for logits
//! rows delivered to host memory), checked against fresh decoding.

use std::path::{Path, PathBuf};

use duo_core::runtime::{CausalLm, HostTraffic, ModelOptions, Sequence};

/// Edits reproduce fresh decoding to this bound (absolute, on logits of
/// magnitude ~10; the only differences are summation orders).
const EDIT_TOLERANCE: f32 = 1e-5;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn load(name: &str) -> CausalLm {
    CausalLm::load(&models().join(name), &ModelOptions::default()).expect("bundled model loads")
}

fn prompt() -> Vec<u32> {
    (0..24).map(|i| 3 + (i * 37) % 2000).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn prefilled(lm: &mut CausalLm, tokens: &[u32]) -> Sequence {
    let mut seq = lm.sequence().unwrap();
    lm.extend(&mut seq, tokens).unwrap();
    seq
}

/// Rollback (on-device Slice) then feeding again equals never having fed the
/// rejected tokens, for every rollback depth of a 6-token block.
#[test]
fn rollback_equals_fresh_decoding() {
    let mut lm = load("target");
    let p = prompt();
    let block = [11, 12, 13, 14, 15, 16];
    for keep in 0..=block.len() {
        let mut fresh = prefilled(&mut lm, &p);
        if keep > 0 {
            lm.extend(&mut fresh, &block[..keep]).unwrap();
        }
        let want = lm.extend(&mut fresh, &[99]).unwrap();

        let mut rolled = prefilled(&mut lm, &p);
        lm.extend(&mut rolled, &block).unwrap();
        rolled.truncate(p.len() + keep).unwrap();
        if keep > 0 {
            // The fresh side fed the kept tokens as one block: so does this
            // one, after a deeper rollback, so both compute the same shapes.
            rolled.truncate(p.len()).unwrap();
            lm.extend(&mut rolled, &block[..keep]).unwrap();
        }
        let got = lm.extend(&mut rolled, &[99]).unwrap();
        assert_eq!(rolled.tokens(), fresh.tokens());
        let d = max_diff(got.last(), want.last());
        assert!(d <= EDIT_TOLERANCE, "keep {keep}: rollback vs fresh {d}");
    }
}

/// Forking (on-device Tile), stepping the branches as one batch and keeping
/// one (on-device Slice of a batch row) equals decoding that branch alone.
#[test]
fn fork_and_keep_equal_fresh_decoding() {
    let mut lm = load("draft");
    let p = prompt();
    let base = prefilled(&mut lm, &p);
    let steps: [[u32; 3]; 3] = [[5, 6, 7], [8, 9, 10], [20, 21, 22]];
    let branches = |lm: &mut CausalLm| {
        let mut br = base.fork(3).unwrap();
        let logits: Vec<_> = steps
            .iter()
            .map(|toks| lm.extend_branches(&mut br, toks).unwrap())
            .collect();
        (br, logits)
    };
    let (_, batched) = branches(&mut lm);
    for j in 0..3 {
        let mut alone = prefilled(&mut lm, &p);
        for (step, toks) in steps.iter().enumerate() {
            let l = lm.extend(&mut alone, &[toks[j]]).unwrap();
            let d = max_diff(l.last(), batched[step].row(j));
            assert!(d <= EDIT_TOLERANCE, "branch {j} step {step}: {d}");
        }
        let mut kept = branches(&mut lm).0.keep(j, 2).unwrap();
        let mut alone_kept = prefilled(&mut lm, &p);
        for toks in &steps[..2] {
            lm.extend(&mut alone_kept, &[toks[j]]).unwrap();
        }
        let got = lm.extend(&mut kept, &[42]).unwrap();
        let want = lm.extend(&mut alone_kept, &[42]).unwrap();
        assert_eq!(kept.tokens(), alone_kept.tokens());
        let d = max_diff(got.last(), want.last());
        assert!(d <= EDIT_TOLERANCE, "kept branch {j}: {d}");
    }
}

/// `extend_last` delivers exactly the last rows `extend` would.
#[test]
fn selected_rows_equal_all_rows() {
    let mut lm = load("target");
    let p = prompt();
    let all = lm.extend(&mut lm.sequence().unwrap(), &p).unwrap();
    for rows in [1, 3, p.len()] {
        let mut seq = lm.sequence().unwrap();
        let some = lm.extend_last(&mut seq, &p, rows).unwrap();
        assert_eq!(some.rows(), rows);
        for i in 0..rows {
            assert_eq!(
                some.row(i),
                all.row(p.len() - rows + i),
                "rows {rows}, row {i}"
            );
        }
        assert_eq!(seq.tokens(), &p[..]);
    }
}

/// Host traffic: only ids, mask, positions in and the asked-for logits rows
/// out; rollbacks, forks and keeps move nothing through host memory.
#[test]
fn only_logits_rows_reach_the_host() {
    let mut lm = load("target");
    let vocab = lm.info().vocab_size as u64;
    let p = prompt();
    let n = p.len() as u64;
    let before = lm.host_traffic();
    let mut seq = lm.sequence().unwrap();
    lm.extend_last(&mut seq, &p, 1).unwrap();
    let after_prefill = lm.host_traffic();
    assert_eq!(
        delta(before, after_prefill),
        HostTraffic {
            forwards: 1,
            // ids [1, n], mask [1, n], positions [1, n], int64
            to_device_bytes: 3 * n * 8,
            to_host_bytes: vocab * 4,
        }
    );
    // A verification of 4 drafted tokens: 5 fed, 5 rows back.
    lm.extend(&mut seq, &[7, 8, 9, 10, 11]).unwrap();
    let after_verify = lm.host_traffic();
    assert_eq!(
        delta(after_prefill, after_verify),
        HostTraffic {
            forwards: 1,
            to_device_bytes: (5 + (n + 5) + 5) * 8,
            to_host_bytes: 5 * vocab * 4,
        }
    );
    seq.truncate(p.len() + 2).unwrap();
    let br = seq.fork(4).unwrap();
    let kept = br.keep(2, 0).unwrap();
    assert_eq!(kept.len(), p.len() + 2);
    assert_eq!(lm.host_traffic(), after_verify, "edits cross no bus");
}

fn delta(a: HostTraffic, b: HostTraffic) -> HostTraffic {
    HostTraffic {
        forwards: b.forwards - a.forwards,
        to_device_bytes: b.to_device_bytes - a.to_device_bytes,
        to_host_bytes: b.to_host_bytes - a.to_host_bytes,
    }
}
