//! Sampling fidelity of the whole speculative loop (`engine::session::run`:
//! round state machine, verification, branch choice, termination) with a
//! small synthetic Markov target and a *different* synthetic draft, so the
//! test is fast and has power: the first emitted tokens under speculative
//! and duodecoding must follow the target's exact distribution.

use duo_core::engine::session::{
    self, DraftSide, GenerateParams, Limits, Mode, Recovery, TargetSide,
};
use duo_core::engine::{DraftJob, DraftTree, EngineError, TargetVerdict};
use duo_core::sampling::{Rng, SamplingParams, argmax, rng_from_seed, top_softmax};
use duo_core::spec::budget::{BudgetConfig, BudgetController};
use duo_core::spec::verify::verify_deterministic;
use duo_core::stats::chi_square;
use duo_core::tokenizer::Tokenizer;

const V: usize = 6;

/// Target logits given the previous token.
fn target_logits(prev: u32) -> Vec<f32> {
    (0..V)
        .map(|t| (((t * 7 + prev as usize * 3) % 11) as f32) * 0.35 - (t as f32) * 0.1)
        .collect()
}

/// Draft logits: correlated with the target but not equal.
fn draft_logits(prev: u32) -> Vec<f32> {
    (0..V)
        .map(|t| (((t * 5 + prev as usize * 3) % 11) as f32) * 0.3)
        .collect()
}

struct ToyTarget {
    ctx: Vec<u32>,
    sampling: SamplingParams,
    rng: Rng,
}

impl TargetSide for ToyTarget {
    fn verify(
        &mut self,
        keep: usize,
        feed: &[u32],
        tail: &[u32],
    ) -> Result<TargetVerdict, EngineError> {
        assert!(
            keep <= self.ctx.len(),
            "target asked to keep more than it holds"
        );
        self.ctx.truncate(keep);
        self.ctx.extend_from_slice(feed);
        let n = self.ctx.len();
        let dists: Vec<_> = (n - tail.len() - 1..n)
            .map(|i| self.sampling.distribution(&target_logits(self.ctx[i])))
            .collect();
        Ok(TargetVerdict {
            verdict: verify_deterministic(&dists, tail, &mut self.rng).unwrap(),
            logprobs: Vec::new(),
            fed: feed.len(),
            secs: 0.0,
        })
    }
}

/// A draft that mirrors the real drafter's contract: applies the sync, then
/// drafts greedy branches headed by the policy's candidates.
struct ToyDraft {
    ctx: Vec<u32>,
    last: Vec<Vec<u32>>,
    pending: Option<DraftJob>,
}

impl DraftSide for ToyDraft {
    fn submit(&mut self, job: DraftJob) -> Result<(), EngineError> {
        self.pending = Some(job);
        Ok(())
    }

    fn collect(&mut self) -> Result<DraftTree, EngineError> {
        let job = self.pending.take().expect("submit before collect");
        if let Some(j) = job.sync.adopt {
            self.ctx.extend_from_slice(&self.last[j]);
        }
        self.ctx.truncate(job.sync.keep);
        self.ctx.extend_from_slice(&job.sync.append);
        let prev = *self.ctx.last().unwrap();
        let q1 = top_softmax(&draft_logits(prev), 8);
        let x1 = q1[0].0;
        let p21 = top_softmax(&draft_logits(x1), 1)[0].1;
        let k = job.policy.branch_count(&q1, p21);
        let heads = if k > 1 {
            job.policy.branch_heads(&q1, k)
        } else {
            vec![x1]
        };
        let branches: Vec<Vec<u32>> = heads
            .iter()
            .map(|&h| {
                let mut b = vec![h];
                while b.len() < job.gamma {
                    b.push(argmax(&draft_logits(*b.last().unwrap())));
                }
                b
            })
            .collect();
        if branches.len() == 1 {
            // A single chain is part of the context right away.
            self.ctx.extend_from_slice(&branches[0]);
            self.last = vec![Vec::new()];
        } else {
            self.last = branches.clone();
        }
        Ok(DraftTree {
            branches,
            forward_steps: job.gamma,
            secs: 0.0,
        })
    }
}

/// A draft worker that dies every `period`-th call: like a worker process
/// killed mid-generation, it loses its state, and the replacement (after
/// `recover`) starts empty. Two recoveries in three are `Later` (no worker
/// free yet), so the loop also runs draftless rounds.
struct Flaky {
    inner: ToyDraft,
    calls: usize,
    period: usize,
    recoveries: usize,
}

impl Flaky {
    fn new(period: usize) -> Self {
        Self {
            inner: ToyDraft {
                ctx: Vec::new(),
                last: Vec::new(),
                pending: None,
            },
            calls: 0,
            period,
            recoveries: 0,
        }
    }

    fn tick(&mut self) -> Result<(), EngineError> {
        self.calls += 1;
        if self.calls.is_multiple_of(self.period) {
            return Err(EngineError::Unavailable("draft", "worker died".into()));
        }
        Ok(())
    }
}

impl DraftSide for Flaky {
    fn submit(&mut self, job: DraftJob) -> Result<(), EngineError> {
        self.tick()?;
        self.inner.submit(job)
    }

    fn collect(&mut self) -> Result<DraftTree, EngineError> {
        self.tick()?;
        self.inner.collect()
    }

    fn recover(&mut self) -> Recovery {
        self.recoveries += 1;
        self.inner = Flaky::new(1).inner;
        if self.recoveries % 3 == 1 {
            Recovery::Ready
        } else {
            Recovery::Later
        }
    }
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/tokenizer.json"
    ))
    .unwrap()
}

/// Runs `n` generations of 3 tokens and returns counts of (x1, x2) pairs.
fn joint_counts(mode: Mode, sampling: SamplingParams, gamma: usize, n: usize) -> Vec<u32> {
    joint_counts_with(mode, sampling, gamma, n, None)
}

/// As [`joint_counts`]; with `flaky_period`, the draft dies every that many calls.
fn joint_counts_with(
    mode: Mode,
    sampling: SamplingParams,
    gamma: usize,
    n: usize,
    flaky_period: Option<usize>,
) -> Vec<u32> {
    let tok = tokenizer();
    let limits = Limits {
        context_len: 64,
        vocab_size: 2048,
        eos: None,
    };
    let mut counts = vec![0u32; V * V];
    let mut budget = BudgetController::new(BudgetConfig::fixed(gamma));
    for seed in 0..n as u64 {
        let mut target = ToyTarget {
            ctx: Vec::new(),
            sampling,
            rng: rng_from_seed(seed * 7919 + 13),
        };
        let mut draft = ToyDraft {
            ctx: Vec::new(),
            last: Vec::new(),
            pending: None,
        };
        let params = GenerateParams {
            max_new_tokens: 3,
            sampling,
            seed: seed * 7919 + 13,
            mode,
            gamma: Some(gamma),
            max_branches: 4,
            ..GenerateParams::default()
        };
        let mut flaky = flaky_period.map(Flaky::new);
        let draft_side: Option<&mut dyn DraftSide> = match (mode, flaky.as_mut()) {
            (Mode::Autoregressive, _) => None,
            (_, Some(f)) => Some(f),
            (_, None) => Some(&mut draft),
        };
        let g = session::run(
            &mut target,
            draft_side,
            &tok,
            &limits,
            &mut budget,
            vec![2, 0],
            &params,
            &mut |_, _, _| true,
        )
        .unwrap();
        assert_eq!(g.tokens.len(), 3);
        counts[g.tokens[0] as usize * V + g.tokens[1] as usize] += 1;
    }
    counts
}

fn exact_joint(sampling: SamplingParams) -> Vec<f32> {
    let p1 = sampling.distribution(&target_logits(0));
    let mut out = vec![0f32; V * V];
    for a in 0..V as u32 {
        let p2 = sampling.distribution(&target_logits(a));
        for b in 0..V as u32 {
            out[a as usize * V + b as usize] = p1.prob(a) * p2.prob(b);
        }
    }
    out
}

#[test]
fn speculative_and_duodecoding_sample_the_target_distribution() {
    let settings = [
        SamplingParams::with_temperature(1.0),
        SamplingParams {
            temperature: 0.7,
            top_k: 4,
            top_p: 1.0,
        },
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
        },
    ];
    for s in settings {
        let exact = exact_joint(s);
        for mode in [Mode::Autoregressive, Mode::Speculative, Mode::Duodecoding] {
            for gamma in [1, 3] {
                let counts = joint_counts(mode, s, gamma, 6000);
                let stat = chi_square(&counts, &exact);
                assert!(stat.p_value > 0.01, "{mode} gamma {gamma} {s:?}: {stat:?}");
            }
        }
    }
}

#[test]
fn the_harness_detects_a_biased_sampler() {
    // Power check: a target that is slightly off (temperature 1.15 instead
    // of 1.0) is rejected by the same test.
    let counts = joint_counts(
        Mode::Duodecoding,
        SamplingParams::with_temperature(1.15),
        3,
        6000,
    );
    let stat = chi_square(&counts, &exact_joint(SamplingParams::with_temperature(1.0)));
    assert!(stat.p_value < 0.01, "{stat:?}");
}

#[test]
fn a_dying_draft_leaves_the_sampled_distribution_unchanged() {
    let s = SamplingParams::with_temperature(1.0);
    let exact = exact_joint(s);
    for mode in [Mode::Speculative, Mode::Duodecoding] {
        for period in [2, 3] {
            let counts = joint_counts_with(mode, s, 3, 6000, Some(period));
            let stat = chi_square(&counts, &exact);
            assert!(stat.p_value > 0.01, "{mode} period {period}: {stat:?}");
        }
    }
}

#[test]
fn a_dying_draft_leaves_greedy_output_unchanged() {
    let tok = tokenizer();
    let limits = Limits {
        context_len: 128,
        vocab_size: 2048,
        eos: None,
    };
    let run = |mode: Mode, flaky: Option<usize>| {
        let mut target = ToyTarget {
            ctx: Vec::new(),
            sampling: SamplingParams::greedy(),
            rng: rng_from_seed(1),
        };
        let mut draft = flaky.map(Flaky::new);
        let params = GenerateParams {
            max_new_tokens: 60,
            mode,
            gamma: Some(3),
            ..GenerateParams::default()
        };
        let mut budget = BudgetController::new(BudgetConfig::fixed(3));
        session::run(
            &mut target,
            draft.as_mut().map(|d| d as &mut dyn DraftSide),
            &tok,
            &limits,
            &mut budget,
            vec![2, 0, 5],
            &params,
            &mut |_, _, _| true,
        )
        .unwrap()
    };
    let reference = run(Mode::Autoregressive, None).tokens;
    for mode in [Mode::Speculative, Mode::Duodecoding] {
        for period in [2, 3, 5, 7] {
            let g = run(mode, Some(period));
            assert_eq!(
                g.tokens, reference,
                "{mode} with a draft dying every {period} calls"
            );
            assert!(
                g.stats.draft_failures > 0,
                "{mode} {period}: no failure injected"
            );
            assert!(
                g.stats.draftless_rounds > 0,
                "{mode} {period}: never ran draftless"
            );
            // (With every second call failing, speculative mode's
            // submit-then-collect never completes.)
            if period > 2 {
                assert!(
                    g.stats.accepted > 0,
                    "{mode} {period}: the draft never helped"
                );
            }
        }
    }
}
