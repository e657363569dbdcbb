//! Sampling fidelity of the whole speculative loop (`engine::driver::run`:
//! round state machine, verification, branch choice, termination) with a
//! small synthetic Markov target and a *different* synthetic draft, so the
//! test is fast and has power: the first emitted tokens under speculative
//! and duodecoding must follow the target's exact distribution.

use duo_core::engine::driver::{
    self, DraftSide, GenerateParams, Limits, Mode, Recovery, TargetSide,
};
use duo_core::engine::{DraftJob, DraftTree, EngineError, TargetVerdict};
use duo_core::sampling::{
    Distribution, Rng, SamplingParams, argmax, draft_rng, rng_from_seed, top_softmax,
};
use duo_core::speculative::budget::{BudgetConfig, BudgetController};
use duo_core::speculative::verify::{ChainVerdict, verify_deterministic, verify_sampled};
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
    /// A deliberately wrong sampled verification (on rejection it draws
    /// from `p` instead of `norm(max(0, p - q))`), for the power check.
    wrong_residual: bool,
}

/// `verify_sampled` with the residual left out: biased towards the draft.
fn wrong_verify_sampled(
    target: &[Distribution],
    draft: &[u32],
    proposals: &[Distribution],
    rng: &mut Rng,
) -> ChainVerdict {
    use rand::Rng as _;
    for (i, ((&x, p), q)) in draft.iter().zip(target).zip(proposals).enumerate() {
        let (px, qx) = (f64::from(p.prob(x)), f64::from(q.prob(x)));
        if !(px >= qx || rng.random::<f64>() * qx < px) {
            return ChainVerdict {
                accepted: i,
                next: p.sample(rng),
            };
        }
    }
    ChainVerdict {
        accepted: draft.len(),
        next: target[draft.len()].sample(rng),
    }
}

impl TargetSide for ToyTarget {
    fn verify(
        &mut self,
        keep: usize,
        feed: &[u32],
        tail: &[u32],
        proposals: &[Distribution],
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
        let verdict = match (proposals.is_empty(), self.wrong_residual) {
            (true, _) => verify_deterministic(&dists, tail, &mut self.rng).unwrap(),
            (false, false) => verify_sampled(&dists, tail, proposals, &mut self.rng).unwrap(),
            (false, true) => wrong_verify_sampled(&dists, tail, proposals, &mut self.rng),
        };
        Ok(TargetVerdict {
            verdict,
            logprobs: Vec::new(),
            fed: feed.len(),
            secs: 0.0,
        })
    }
}

/// A draft that mirrors the real drafter's contract: applies the sync, then
/// drafts branches headed by the policy's candidates (a first token that
/// will be verified is sampled too), greedily or, with `sampled`, by
/// sampling each later token from its proposal.
struct ToyDraft {
    ctx: Vec<u32>,
    last: Vec<Vec<u32>>,
    pending: Option<DraftJob>,
    sampled: Option<(SamplingParams, Rng)>,
}

impl ToyDraft {
    fn new(sampled: Option<(SamplingParams, Rng)>) -> Self {
        Self {
            ctx: Vec::new(),
            last: Vec::new(),
            pending: None,
            sampled,
        }
    }

    /// The next token after `prev` and, when sampling, its proposal.
    fn pick(&mut self, prev: u32) -> (u32, Option<Distribution>) {
        match &mut self.sampled {
            None => (argmax(&draft_logits(prev)), None),
            Some((params, rng)) => {
                let q = duo_core::engine::proposal(params, &draft_logits(prev));
                (q.sample(rng), Some(q))
            }
        }
    }
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
        let sampled = self.sampled.is_some();
        let (heads, head_qs) = if job.first_verified {
            let (x1, q) = self.pick(prev);
            (vec![x1], vec![q])
        } else {
            let x1 = q1[0].0;
            let p21 = top_softmax(&draft_logits(x1), 1)[0].1;
            let k = job.policy.branch_count(&q1, p21);
            let heads = if k > 1 {
                job.policy.branch_heads(&q1, k)
            } else {
                vec![x1]
            };
            let qs = heads
                .iter()
                .map(|&h| sampled.then(|| Distribution::point(h)))
                .collect();
            (heads, qs)
        };
        let mut branches = Vec::new();
        let mut proposals = Vec::new();
        for (&h, q) in heads.iter().zip(head_qs) {
            let mut b = vec![h];
            let mut qs: Vec<Distribution> = q.into_iter().collect();
            while b.len() < job.gamma {
                let (t, q) = self.pick(*b.last().unwrap());
                b.push(t);
                qs.extend(q);
            }
            branches.push(b);
            proposals.push(qs);
        }
        if !sampled {
            proposals.clear();
        }
        if branches.len() == 1 {
            // A single chain is part of the context right away.
            self.ctx.extend_from_slice(&branches[0]);
            self.last = vec![Vec::new()];
        } else {
            self.last = branches.clone();
        }
        Ok(DraftTree {
            anchors: Vec::new(),
            branches,
            proposals,
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
            inner: ToyDraft::new(None),
            calls: 0,
            period,
            recoveries: 0,
        }
    }

    fn tick(&mut self) -> Result<(), EngineError> {
        self.calls += 1;
        if self.calls.is_multiple_of(self.period) {
            return Err(EngineError::unavailable("draft", "worker died"));
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
    joint_counts_with(mode, sampling, gamma, n, Variant::default())
}

/// How [`joint_counts_with`] departs from the plain loop.
#[derive(Default, Clone, Copy)]
struct Variant {
    /// The draft dies every that many calls.
    flaky_period: Option<usize>,
    /// Sampled drafts with proposals (else greedy drafts).
    sampled: bool,
    /// The target verifies sampled drafts with a wrong residual.
    wrong_residual: bool,
}

/// As [`joint_counts`], with the departures of `v`.
fn joint_counts_with(
    mode: Mode,
    sampling: SamplingParams,
    gamma: usize,
    n: usize,
    v: Variant,
) -> Vec<u32> {
    let tok = tokenizer();
    let limits = Limits {
        context_len: 64,
        vocab_size: 2048,
        eos: Vec::new(),
    };
    let mut counts = vec![0u32; V * V];
    let mut budget = BudgetController::new(BudgetConfig::fixed(gamma));
    for seed in 0..n as u64 {
        let mut target = ToyTarget {
            ctx: Vec::new(),
            sampling,
            rng: rng_from_seed(seed * 7919 + 13),
            wrong_residual: v.wrong_residual,
        };
        let mut draft = ToyDraft::new(v.sampled.then(|| (sampling, draft_rng(seed * 7919 + 13))));
        let params = GenerateParams {
            max_new_tokens: 3,
            sampling,
            seed: seed * 7919 + 13,
            mode,
            gamma: Some(gamma),
            max_branches: 4,
            ..GenerateParams::default()
        };
        let mut flaky = v.flaky_period.map(|p| {
            let mut f = Flaky::new(p);
            f.inner = ToyDraft::new(v.sampled.then(|| (sampling, draft_rng(seed))));
            f
        });
        let draft_side: Option<&mut dyn DraftSide> = match (mode, flaky.as_mut()) {
            (Mode::Autoregressive, _) => None,
            (_, Some(f)) => Some(f),
            (_, None) => Some(&mut draft),
        };
        let g = driver::run(
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

/// Sampled drafts (tokens drawn from the draft's own processed
/// distribution, verified with min(1, p/q) and the residual): the emitted
/// tokens follow the target's distribution, for speculative mode (the whole
/// chain sampled) and duodecoding (1 and up to 4 branches: heads matched
/// against the target's draw, the rest sampled).
#[test]
fn sampled_drafts_sample_the_target_distribution() {
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
    let sampled = Variant {
        sampled: true,
        ..Variant::default()
    };
    for s in settings {
        let exact = exact_joint(s);
        for mode in [Mode::Speculative, Mode::Duodecoding] {
            for gamma in [1, 3] {
                let counts = joint_counts_with(mode, s, gamma, 6000, sampled);
                let stat = chi_square(&counts, &exact);
                assert!(
                    stat.p_value > 0.01,
                    "sampled {mode} gamma {gamma} {s:?}: {stat:?}"
                );
            }
        }
    }
}

#[test]
fn the_harness_detects_a_wrong_residual() {
    // Power check for sampled drafts: rejecting into p instead of the
    // residual norm(max(0, p - q)) over-weights the draft's tokens.
    let s = SamplingParams::with_temperature(1.0);
    let counts = joint_counts_with(
        Mode::Speculative,
        s,
        3,
        6000,
        Variant {
            sampled: true,
            wrong_residual: true,
            ..Variant::default()
        },
    );
    let stat = chi_square(&counts, &exact_joint(s));
    assert!(stat.p_value < 0.01, "{stat:?}");
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
            let counts = joint_counts_with(
                mode,
                s,
                3,
                6000,
                Variant {
                    flaky_period: Some(period),
                    sampled: true,
                    ..Variant::default()
                },
            );
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
        eos: Vec::new(),
    };
    let run = |mode: Mode, flaky: Option<usize>| {
        let mut target = ToyTarget {
            ctx: Vec::new(),
            sampling: SamplingParams::greedy(),
            rng: rng_from_seed(1),
            wrong_residual: false,
        };
        let mut draft = flaky.map(Flaky::new);
        let params = GenerateParams {
            max_new_tokens: 60,
            mode,
            gamma: Some(3),
            ..GenerateParams::default()
        };
        let mut budget = BudgetController::new(BudgetConfig::fixed(3));
        driver::run(
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
