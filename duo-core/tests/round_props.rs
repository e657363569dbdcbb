//! Property tests (proptest) over the pure speculative logic: random
//! sequences of verdicts and draft trees driven through the round state
//! machine, and random requests through validation. Nothing panics, and
//! the invariants hold: the committed sequence only grows, by exactly the
//! accepted tail plus one token; the draft's context is always
//! `committed + tail`; a refused step changes nothing.
//!
//! `PROPTEST_CASES` sets the number of cases (default 256; CI runs the
//! default, longer runs locally).

use duo_core::engine::driver::{GenerateParams, Limits, Mode, validate};
use duo_core::sampling::SamplingParams;
use duo_core::speculative::round::Round;
use duo_core::speculative::verify::ChainVerdict;
use proptest::prelude::*;

/// Hedge hits over all cases of [`hedged_rounds_commit_target_only_decoding`]
/// (checked by [`hedges_were_hit`]).
static HEDGE_HITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A deterministic stand-in target over a 6-token vocabulary: its greedy
/// next token after `ctx` (a hash of the context, so that rejections and
/// hedge hits are common).
fn target_next(ctx: &[u32]) -> u32 {
    let h = ctx.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
        (h ^ u64::from(t)).wrapping_mul(0x100_0000_01b3)
    });
    (h % 6) as u32
}

/// The greedy verdict of `target_next` on the round's tail.
fn greedy_verdict(r: &Round) -> ChainVerdict {
    let mut ctx = r.committed().to_vec();
    for (i, &t) in r.tail().iter().enumerate() {
        let want = target_next(&ctx);
        if want != t {
            return ChainVerdict {
                accepted: i,
                next: want,
            };
        }
        ctx.push(t);
    }
    ChainVerdict {
        accepted: r.tail().len(),
        next: target_next(&ctx),
    }
}

/// One round's draft: branches `(anchor, follow target?, tokens)` — a
/// branch that follows the target starts with the target's own token at
/// its anchor and continues with it for `good` tokens, then random ones.
#[derive(Debug, Clone)]
struct Offer {
    rows: Vec<(Option<usize>, usize, Vec<u32>)>,
}

fn offer() -> impl Strategy<Value = Offer> {
    prop::collection::vec(
        (
            prop::option::of(0usize..6),
            0usize..5,
            prop::collection::vec(0u32..6, 1..6),
        ),
        0..6,
    )
    .prop_map(|rows| Offer { rows })
}

/// One round's inputs: a verdict (possibly invalid) and branches (possibly
/// with empty ones).
#[derive(Debug, Clone)]
struct Step {
    accepted: usize,
    next: u32,
    branches: Vec<Vec<u32>>,
}

fn step() -> impl Strategy<Value = Step> {
    (
        0usize..10,
        0u32..50,
        prop::collection::vec(prop::collection::vec(0u32..50, 0..6), 0..5),
    )
        .prop_map(|(accepted, next, branches)| Step {
            accepted,
            next,
            branches,
        })
}

proptest! {
    #[test]
    fn round_invariants_hold_under_any_driver(
        prompt in prop::collection::vec(0u32..50, 1..20),
        steps in prop::collection::vec(step(), 1..40),
        spec_tails in prop::collection::vec(prop::option::of(prop::collection::vec(0u32..50, 0..5)), 40),
    ) {
        let mut r = Round::new(prompt.clone());
        prop_assert_eq!(r.draft_sync().append.clone(), prompt.clone());
        for (i, s) in steps.iter().enumerate() {
            // Sometimes drive it like speculative mode: set a tail first.
            if r.tail().is_empty() && let Some(Some(t)) = spec_tails.get(i) {
                r.set_tail(t.clone(), vec![]).unwrap();
            } else if let Some(Some(t)) = spec_tails.get(i) {
                prop_assert!(r.set_tail(t.clone(), vec![]).is_err());
            }
            let before = r.clone();
            let committed_before = r.committed().len();
            let tail_before = r.tail().to_vec();
            let verdict = ChainVerdict { accepted: s.accepted, next: s.next };
            let preview = r.preview(&verdict);
            match r.apply(verdict, &s.branches, &[]) {
                Ok(out) => {
                    prop_assert!(s.accepted <= tail_before.len());
                    prop_assert!(s.branches.iter().all(|b| !b.is_empty()));
                    prop_assert_eq!(r.committed().len(), committed_before + s.accepted + 1);
                    prop_assert_eq!(&out.committed[..s.accepted], &tail_before[..s.accepted]);
                    prop_assert_eq!(*out.committed.last().unwrap(), s.next);
                    prop_assert_eq!(preview.unwrap(), out.committed.clone());
                    prop_assert_eq!(r.draft_context_len(), r.committed().len() + r.tail().len());
                    prop_assert_eq!(r.target_keep(), r.committed().len() - 1);
                    prop_assert_eq!(r.full_draft_sync().append.len(), r.draft_context_len());
                    prop_assert!(r.committed().starts_with(&prompt));
                    if let Some(j) = out.branch_hit {
                        prop_assert_eq!(s.branches[j][0], s.next);
                        prop_assert_eq!(r.tail(), &s.branches[j][1..]);
                    } else {
                        prop_assert!(r.tail().is_empty());
                    }
                }
                Err(_) => {
                    // Refused: nothing changed.
                    prop_assert_eq!(r.committed(), before.committed());
                    prop_assert_eq!(r.tail(), before.tail());
                    prop_assert_eq!(r.draft_sync(), before.draft_sync());
                }
            }
        }
    }

    #[test]
    fn validation_never_panics_and_accepts_only_sane_requests(
        prompt in prop::collection::vec(0u32..3000, 0..40),
        max_new in 0usize..600,
        temperature in prop::num::f32::ANY,
        top_k in 0usize..5000,
        top_p in prop::num::f32::ANY,
        gamma in prop::option::of(0usize..100),
        max_branches in 0usize..20,
    ) {
        let limits = Limits { context_len: 512, vocab_size: 2048, eos: vec![0] };
        let params = GenerateParams {
            max_new_tokens: max_new,
            sampling: SamplingParams { temperature, top_k, top_p },
            gamma,
            max_branches,
            mode: Mode::Duodecoding,
            ..GenerateParams::default()
        };
        if validate(&prompt, &params, &limits).is_ok() {
            prop_assert!(!prompt.is_empty());
            prop_assert!(max_new >= 1 && prompt.len() + max_new <= 512);
            prop_assert!(prompt.iter().all(|&t| t < 2048));
            prop_assert!(temperature.is_finite() && temperature >= 0.0);
            prop_assert!(top_p > 0.0 && top_p <= 1.0);
            prop_assert!(gamma.is_none_or(|g| (1..=64).contains(&g)));
            prop_assert!((1..=8).contains(&max_branches));
        }
    }

    /// Hedged drafting is lossless: whatever branches and hedges a draft
    /// offers (anchored anywhere in the tail, following the target or not,
    /// malformed ones refused and the round run without them), the
    /// committed tokens are exactly the target's own greedy decoding.
    #[test]
    fn hedged_rounds_commit_target_only_decoding(
        prompt in prop::collection::vec(0u32..6, 1..8),
        offers in prop::collection::vec(offer(), 1..40),
    ) {
        let mut r = Round::new(prompt.clone());
        let mut hedge_hits = 0;
        for o in &offers {
            let verdict = greedy_verdict(&r);
            let m = r.tail().len();
            let mut branches = Vec::new();
            let mut anchors = Vec::new();
            for (anchor, good, tokens) in &o.rows {
                let a = anchor.map(|a| a.min(m));
                let mut ctx = r.committed().to_vec();
                ctx.extend_from_slice(&r.tail()[..a.unwrap_or(m)]);
                let mut b = Vec::new();
                for (i, &t) in tokens.iter().enumerate() {
                    let tok = if i < *good { target_next(&ctx) } else { t };
                    b.push(tok);
                    ctx.push(tok);
                }
                let a = a.filter(|&a| a < m);
                // Well-formed offers only (malformed ones are refused:
                // the unit tests of the round machine show it).
                let anchor_at = a.unwrap_or(m);
                let clash = a.is_some_and(|a| r.tail()[a] == b[0])
                    || branches
                        .iter()
                        .zip(&anchors)
                        .any(|(o, oa): (&Vec<u32>, &Option<usize>)| {
                            oa.unwrap_or(m) == anchor_at && o[0] == b[0]
                        });
                if !clash {
                    branches.push(b);
                    anchors.push(a);
                }
            }
            let before = r.committed().len();
            let out = r.apply_anchored(verdict, &branches, &anchors, &[]);
            prop_assert!(out.is_ok(), "{:?}", out);
            let out = out.unwrap();
            prop_assert_eq!(r.committed().len(), before + out.committed.len());
            hedge_hits += usize::from(out.hedge_hit);
            if out.hedge_hit {
                prop_assert!(out.rejected());
            }
        }
        // Target-only greedy decoding of as many tokens.
        let mut want = prompt.clone();
        while want.len() < r.committed().len() {
            let t = target_next(&want);
            want.push(t);
        }
        prop_assert_eq!(r.committed(), &want[..]);
        HEDGE_HITS.fetch_add(hedge_hits, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The hedged-rounds property exercised hedges: it ran them to hits.
#[test]
fn hedges_were_hit() {
    // The property runs in this test's thread first, so the count is its own.
    hedged_rounds_commit_target_only_decoding();
    assert!(HEDGE_HITS.load(std::sync::atomic::Ordering::Relaxed) > 0);
}
