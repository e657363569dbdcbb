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
}
