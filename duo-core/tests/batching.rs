//! Batched forwards across sequences (`CausalLm::extend_batch`,
//! `extend_parts`, and drafters' steps run together by `run_steps`) against the
//! same forwards run one sequence at a time, on the bundled models (real
//! ONNX Runtime): sequences of different context lengths, feeding different
//! numbers of tokens, after rollbacks, in batches whose membership changes
//! from one forward to the next.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use duo_core::runtime::{
    BatchItem, BatchPart, CausalLm, Forwards, Logits, ModelOptions, Sequence, Step, StepClient,
    StepResult, run_steps,
};
use duo_core::sampling::argmax;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn load(name: &str) -> CausalLm {
    CausalLm::load(&models().join(name), &ModelOptions::default()).expect("bundled model loads")
}

/// Prompts of different lengths (the target's PyTorch fixture prompts).
fn prompts() -> Vec<Vec<u32>> {
    #[derive(serde::Deserialize)]
    struct Fixture {
        greedy: Vec<Greedy>,
    }
    #[derive(serde::Deserialize)]
    struct Greedy {
        ids: Vec<u32>,
    }
    let text = std::fs::read_to_string(models().join("fixtures/target.json")).expect("fixture");
    let fx: Fixture = serde_json::from_str(&text).expect("fixture parses");
    fx.greedy.into_iter().map(|g| g.ids).collect()
}

/// Largest |difference| between two sets of logits rows of equal shape.
fn max_diff(a: &Logits, b: &Logits) -> f32 {
    assert_eq!(a.rows(), b.rows(), "row counts");
    (0..a.rows())
        .flat_map(|r| a.row(r).iter().zip(b.row(r)).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

/// Float rounding only: the batch changes summation order, nothing else.
const ROUNDING: f32 = 1e-4;

/// Runs `feeds[i]` (tokens, rows) for `seqs[i]` as one batched forward.
fn batched(lm: &mut CausalLm, seqs: &mut [Sequence], feeds: &[(Vec<u32>, usize)]) -> Vec<Logits> {
    let mut items: Vec<BatchItem<'_>> = seqs
        .iter_mut()
        .zip(feeds)
        .map(|(seq, (tokens, rows))| BatchItem {
            seq,
            tokens,
            rows: *rows,
        })
        .collect();
    lm.extend_batch(&mut items).expect("batched forward")
}

/// Mixed work in one forward — a prefill from an empty context, a
/// verification block and a single step on contexts of different lengths —
/// gives every sequence its solo logits and leaves its cache as a solo
/// forward would (checked by the next, solo, forward).
#[test]
fn a_mixed_batch_equals_solo_forwards() {
    let mut lm = load("target");
    let p = prompts();
    let feeds = vec![
        (p[0][..40].to_vec(), 40),  // a prefill from nothing, all rows
        (p[1][20..29].to_vec(), 9), // a 9-token block after 20
        (vec![p[2][30]], 1),        // one step after 30
        (p[0][60..64].to_vec(), 2), // 4 tokens after 60, last 2 rows
    ];
    let pasts: [&[u32]; 4] = [&[], &p[1][..20], &p[2][..30], &p[0][..60]];
    let fresh = |lm: &mut CausalLm| -> Vec<Sequence> {
        pasts
            .iter()
            .map(|past| {
                let mut seq = lm.sequence().unwrap();
                if !past.is_empty() {
                    lm.extend(&mut seq, past).unwrap();
                }
                seq
            })
            .collect()
    };
    let mut solo = fresh(&mut lm);
    let want: Vec<Logits> = solo
        .iter_mut()
        .zip(&feeds)
        .map(|(seq, (t, rows))| lm.extend_last(seq, t, *rows).unwrap())
        .collect();
    let mut together = fresh(&mut lm);
    let before = lm.host_traffic().forwards;
    let got = batched(&mut lm, &mut together, &feeds);
    assert_eq!(
        lm.host_traffic().forwards,
        before + 1,
        "one forward for the batch"
    );
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let d = max_diff(g, w);
        assert!(d <= ROUNDING, "item {i}: logits differ by {d}");
        assert_eq!(argmax(g.last()), argmax(w.last()), "item {i}: argmax");
    }
    for (i, (a, b)) in together.iter_mut().zip(solo.iter_mut()).enumerate() {
        assert_eq!(a.tokens(), b.tokens(), "item {i}: context");
        let next = [p[0][70 + i]];
        let (x, y) = (lm.extend(a, &next).unwrap(), lm.extend(b, &next).unwrap());
        let d = max_diff(&x, &y);
        assert!(
            d <= ROUNDING,
            "item {i}: the cache after the batch differs by {d}"
        );
    }
}

/// Greedy decoding of several prompts, batched step by step while members
/// join late, roll back and leave, yields each prompt's solo tokens.
#[test]
fn batched_greedy_decoding_yields_solo_tokens() {
    let mut lm = load("target");
    let p = prompts();
    let steps = 24;
    let solo: Vec<Vec<u32>> = p
        .iter()
        .map(|prompt| {
            let mut seq = lm.sequence().unwrap();
            let mut next = argmax(lm.extend(&mut seq, prompt).unwrap().last());
            let mut out = Vec::new();
            for _ in 0..steps {
                out.push(next);
                next = argmax(lm.extend(&mut seq, &[next]).unwrap().last());
            }
            out
        })
        .collect();
    // State per prompt: its sequence, next token, tokens so far.
    let mut seqs: Vec<Sequence> = p.iter().map(|_| lm.sequence().unwrap()).collect();
    let mut next: Vec<Option<u32>> = vec![None; p.len()];
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); p.len()];
    for step in 0..steps + 8 {
        // Prompt i joins at step 3i; prompt 1 rolls back two tokens at step 10.
        if step == 10 && out[1].len() >= 2 {
            let keep = seqs[1].len() - 2;
            seqs[1].truncate(keep).unwrap();
            let n = out[1].len() - 2;
            next[1] = Some(out[1][n]);
            out[1].truncate(n);
        }
        let mut members = Vec::new();
        let mut feeds = Vec::new();
        for i in 0..p.len() {
            if step < 3 * i || out[i].len() >= steps {
                continue;
            }
            members.push(i);
            feeds.push(match next[i] {
                None => (p[i].clone(), 1),
                Some(t) => {
                    out[i].push(t);
                    (vec![t], 1)
                }
            });
        }
        if members.is_empty() {
            continue;
        }
        let mut taken: Vec<Sequence> = members
            .iter()
            .map(|&i| std::mem::replace(&mut seqs[i], lm.sequence().unwrap()))
            .collect();
        let logits = batched(&mut lm, &mut taken, &feeds);
        for ((&i, seq), l) in members.iter().zip(taken).zip(&logits) {
            seqs[i] = seq;
            next[i] = Some(argmax(l.last()));
        }
    }
    for (i, (got, want)) in out.iter().zip(&solo).enumerate() {
        assert_eq!(got.len(), steps, "prompt {i} finished");
        assert_eq!(got, want, "prompt {i}: batched greedy tokens");
    }
}

/// A batch of one is the solo forward, bit for bit.
#[test]
fn a_batch_of_one_is_the_solo_forward() {
    let mut lm = load("draft");
    let p = prompts();
    let mut a = lm.sequence().unwrap();
    let mut b = lm.sequence().unwrap();
    let want = lm.extend_last(&mut a, &p[0], 3).unwrap();
    let got = batched(&mut lm, std::slice::from_mut(&mut b), &[(p[0].clone(), 3)]);
    assert_eq!(max_diff(&got[0], &want), 0.0);
}

/// An item that would overrun the context or names a token outside the
/// vocabulary is refused before any forward, and no sequence changes.
#[test]
fn a_bad_item_is_refused_before_the_forward() {
    let mut lm = load("draft");
    let vocab = lm.info().vocab_size as u32;
    let mut seqs = [lm.sequence().unwrap(), lm.sequence().unwrap()];
    let before = lm.host_traffic().forwards;
    let good = [1u32, 2, 3];
    let bad = [4u32, vocab];
    let (s0, s1) = seqs.split_at_mut(1);
    let mut items = [
        BatchItem {
            seq: &mut s0[0],
            tokens: &good,
            rows: 1,
        },
        BatchItem {
            seq: &mut s1[0],
            tokens: &bad,
            rows: 1,
        },
    ];
    let err = lm.extend_batch(&mut items).expect_err("refused");
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    assert_eq!(lm.host_traffic().forwards, before);
    assert!(seqs.iter().all(Sequence::is_empty));
}

/// Branches (k rows of one length) and sequences of other lengths in one
/// forward (`extend_parts`): each part gets the logits of its own call and
/// is left as its own call would leave it (checked by a solo step after).
#[test]
fn branches_and_sequences_share_one_forward() {
    let mut lm = load("draft");
    let p = prompts();
    let prefill = |lm: &mut CausalLm, ctx: &[u32]| {
        let mut seq = lm.sequence().unwrap();
        lm.extend_last(&mut seq, ctx, 1).unwrap();
        seq
    };
    let heads = [p[1][12], p[1][13], p[1][14]];
    let step = [p[0][30]];
    // Solo.
    let mut br_solo = prefill(&mut lm, &p[1][..12]).fork(3).unwrap();
    let mut seq_solo = prefill(&mut lm, &p[0][..30]);
    let want_br = lm.extend_branches(&mut br_solo, &heads).unwrap();
    let want_seq = lm.extend_last(&mut seq_solo, &step, 1).unwrap();
    // One forward.
    let mut br = prefill(&mut lm, &p[1][..12]).fork(3).unwrap();
    let mut seq = prefill(&mut lm, &p[0][..30]);
    let before = lm.host_traffic().forwards;
    let got = lm
        .extend_parts(&mut [
            BatchPart::Branches {
                br: &mut br,
                tokens: &heads,
            },
            BatchPart::Seq(BatchItem {
                seq: &mut seq,
                tokens: &step,
                rows: 1,
            }),
        ])
        .expect("one forward");
    assert_eq!(lm.host_traffic().forwards, before + 1);
    assert!(max_diff(&got[0], &want_br) < ROUNDING);
    assert!(max_diff(&got[1], &want_seq) < ROUNDING);
    for j in 0..3 {
        assert_eq!(br.branch(j), br_solo.branch(j));
    }
    assert_eq!(seq.tokens(), seq_solo.tokens());
    // The caches the batch left behave as the solo ones.
    let next = [p[1][20], p[1][21], p[1][22]];
    let a = lm.extend_branches(&mut br, &next).unwrap();
    let b = lm.extend_branches(&mut br_solo, &next).unwrap();
    assert!(max_diff(&a, &b) < ROUNDING);
    let a = lm.extend_last(&mut seq, &[p[0][31]], 1).unwrap();
    let b = lm.extend_last(&mut seq_solo, &[p[0][31]], 1).unwrap();
    assert!(max_diff(&a, &b) < ROUNDING);
}

/// What caller `i`'s thread got back: its logits (or error) and sequence.
type Outcome = (usize, Result<Logits, String>, Sequence);

/// Four callers on their own threads, each asking for one forward through
/// a `StepClient` (their sequences move to the model's thread and back),
/// run as one `run_steps` call: each gets its solo logits and its
/// sequences back advanced, and the step the model refuses (an id outside
/// the vocabulary) gets its own error while the other three share one
/// forward.
#[test]
fn steps_of_several_callers_run_as_one_forward() {
    let mut lm = load("draft");
    let vocab = lm.info().vocab_size as u32;
    let p = prompts();
    let prefill = |lm: &mut CausalLm, ctx: &[u32]| {
        let mut seq = lm.sequence().unwrap();
        lm.extend_last(&mut seq, ctx, 1).unwrap();
        seq
    };
    let contexts: [&[u32]; 4] = [&p[0][..30], &p[1][..12], &p[2][..5], &p[2][..17]];
    let feeds: [Vec<u32>; 4] = [
        vec![p[0][30]],
        vec![p[1][12]],
        vec![p[2][5], p[2][6]],
        vec![vocab],
    ];
    let (tx, rx) = mpsc::channel::<(Step, mpsc::SyncSender<(Step, StepResult)>)>();
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let callers: Vec<_> = (0..4)
            .map(|i| {
                let mut seq = prefill(&mut lm, contexts[i]);
                let tokens = feeds[i].clone();
                let tx = tx.clone();
                s.spawn(move || {
                    let mut client = StepClient::new(|step| {
                        let (reply, back) = mpsc::sync_channel(1);
                        tx.send((step, reply)).expect("model thread");
                        Ok(back.recv().expect("step back"))
                    });
                    let got = client
                        .extend_last(&mut seq, &tokens, 1)
                        .map_err(|e| e.to_string());
                    (i, got, seq)
                })
            })
            .collect();
        drop(tx);
        let (mut steps, replies): (Vec<Step>, Vec<_>) = (0..4).map(|_| rx.recv().unwrap()).unzip();
        let before = lm.host_traffic().forwards;
        let results = run_steps(&mut lm, &mut steps);
        assert_eq!(
            lm.host_traffic().forwards,
            before + 1,
            "one forward for all"
        );
        for ((step, result), reply) in steps.into_iter().zip(results).zip(replies) {
            reply.send((step, result)).unwrap();
        }
        callers.into_iter().map(|c| c.join().unwrap()).collect()
    });
    for (i, result, seq) in outcomes {
        if i == 3 {
            let err = result.expect_err("refused");
            assert!(err.contains("outside the vocabulary"), "{err}");
            assert_eq!(
                seq.tokens(),
                contexts[3],
                "a refused step leaves its sequence"
            );
            continue;
        }
        let logits = result.expect("step ran");
        let mut solo = prefill(&mut lm, contexts[i]);
        let want = lm.extend_last(&mut solo, &feeds[i], 1).unwrap();
        assert!(max_diff(&logits, &want) < ROUNDING, "caller {i}");
        assert_eq!(
            seq.tokens(),
            solo.tokens(),
            "caller {i}'s sequence came back advanced"
        );
    }
}
