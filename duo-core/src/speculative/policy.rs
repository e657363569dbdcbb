//! Dynamic multi-sequence drafting (docs/architecture.md, "The algorithm"): when the draft is unsure
//! about the next token it drafts several short branches, each starting with
//! one of its top candidates, instead of one long sequence.
//!
//! Greedy-probe two tokens: `p11` is the draft's top probability at position
//! 1, `p21` the top probability at position 2 given that token. With
//! `θ = p11 · p21`, the number of branches is
//! `k = 1 + #(rank 2..8 candidates at position 1 with probability > θ)`,
//! capped at [`BranchPolicy::max_branches`]. The budget γ counts sequential
//! draft steps: the drafter runs the k branches as one batch, each γ tokens
//! long (see `engine::drafter`), so the draft's time stays at the budget.

use std::collections::HashSet;

/// Upper bound on the number of branches (and on the candidate rank
/// considered): candidates of rank 2..=8 at position 1.
pub const MAX_BRANCHES: usize = 8;

/// How many branches to draft, and which heads they start with.
///
/// Invariant (enforced where it is used): the effective cap is
/// `max_branches` clamped to `1..=MAX_BRANCHES`, so every method returns
/// between 1 and that many branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BranchPolicy {
    /// Most branches per round. Values outside `1..=8` are clamped;
    /// 1 disables multi-sequence drafting.
    pub max_branches: usize,
}

impl Default for BranchPolicy {
    /// Up to 4 branches.
    fn default() -> Self {
        Self { max_branches: 4 }
    }
}

impl BranchPolicy {
    /// A policy with at most `max_branches` branches, clamped to `1..=8`.
    pub fn new(max_branches: usize) -> Self {
        Self {
            max_branches: max_branches.clamp(1, MAX_BRANCHES),
        }
    }

    /// The effective branch cap: `max_branches` clamped to `1..=8`.
    pub fn cap(&self) -> usize {
        self.max_branches.clamp(1, MAX_BRANCHES)
    }

    /// Number of branches `k` for this round, in `1..=self.cap()`.
    ///
    /// `first` holds the draft's most likely candidates at position 1 with
    /// their probabilities, most likely first (at least the top 8 when there
    /// are that many; e.g. [`crate::sampling::top_softmax`]) and `p21` the top
    /// probability at position 2 given `first`'s top token. With
    /// `θ = p11 · p21` (`p11` = top probability of `first`),
    /// `k = 1 + #(candidates of rank 2..=8 with probability > θ)`, capped.
    /// `p21` is clamped to `[0, 1]`; a NaN `p21` counts as 1 (confident:
    /// a single branch).
    pub fn branch_count(&self, first: &[(u32, f32)], p21: f32) -> usize {
        let p21 = if p21.is_nan() {
            1.0
        } else {
            p21.clamp(0.0, 1.0)
        };
        let entries = first;
        let p11 = entries.first().map_or(1.0, |e| e.1);
        let theta = p11 * p21;
        let extra = entries
            .iter()
            .skip(1)
            .take(MAX_BRANCHES - 1)
            .filter(|e| e.1 > theta)
            .count();
        (1 + extra).min(self.cap())
    }

    /// The heads of `k` branches: `first`'s most likely distinct tokens,
    /// most likely first.
    ///
    /// `k` is clamped to `1..=self.cap()`; the result has
    /// `min(k, distinct tokens in first's support)` entries, at least one.
    pub fn branch_heads(&self, first: &[(u32, f32)], k: usize) -> Vec<u32> {
        let k = k.clamp(1, self.cap());
        let mut seen = HashSet::with_capacity(k);
        first
            .iter()
            .map(|e| e.0)
            .filter(|&t| seen.insert(t))
            .take(k)
            .collect()
    }
}

/// Most hedges per round: branches anchored inside the pending tail.
pub const MAX_HEDGES: usize = 8;

/// Candidates the draft keeps per drafted token for hedging: its most
/// likely tokens there (the target's correction is the draft's 2nd choice
/// about half the time, in its top 4 about 80%: docs/architecture.md).
pub const HEDGE_CANDIDATES: usize = 4;

/// A likely verification outcome to draft for: the tail is rejected at
/// position `anchor` and the target puts `head` there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hedge {
    /// Tail position (0-based) the hedge replaces.
    pub anchor: usize,
    /// The token it puts there (never the tail's own token).
    pub head: u32,
    /// The draft's estimate of this outcome's chance: the tail accepted up
    /// to `anchor`, then `head` drawn there.
    pub chance: f32,
}

/// Every hedge the draft's own distributions over the tail suggest, most
/// likely first: for tail position `a` and each candidate `h` ≠ `tail[a]`
/// of `alts[a]` (the draft's most likely tokens where it drafted
/// `tail[a]`, with their probabilities `q_a`),
/// `chance = Π_{i<a} P(accept i) · (1 − P(accept a)) · q_a(h) / (1 − q_a(tail[a]))`:
/// the tail reaches `a`, is rejected there, and the target's correction
/// follows the draft's distribution over the other tokens. `P(accept a)`
/// is `accept[a]` when measured (the acceptance observed at that tail
/// position), else the draft's own `q_a(tail[a])` (the chance is then
/// `Π_{i<a} q_i(tail[i]) · q_a(h)`). Positions without candidates end the
/// list there (nothing is known past them). Also returns the chance, by
/// the same estimates, that the whole tail is accepted (0 when a position
/// had no candidates).
pub fn rank_hedges(
    tail: &[u32],
    alts: &[Vec<(u32, f32)>],
    accept: &[Option<f32>],
) -> (Vec<Hedge>, f32) {
    let mut out = Vec::new();
    let mut survive = 1.0f32;
    for (anchor, (&token, cands)) in tail.iter().zip(alts).enumerate() {
        if cands.is_empty() {
            survive = 0.0;
            break;
        }
        let q_tail = cands.iter().find(|c| c.0 == token).map_or(0.0, |c| c.1);
        let p_accept = accept
            .get(anchor)
            .copied()
            .flatten()
            .unwrap_or(q_tail)
            .clamp(0.0, 1.0);
        let others = (1.0 - q_tail).max(1e-6);
        for &(head, p) in cands {
            if head != token && p > 0.0 {
                out.push(Hedge {
                    anchor,
                    head,
                    chance: survive * (1.0 - p_accept) * (p / others).min(1.0),
                });
            }
        }
        survive *= p_accept;
    }
    out.sort_by(|a, b| b.chance.total_cmp(&a.chance));
    (out, survive)
}

/// How many of `hedges` (ranked, most likely first) to draft beside
/// `branches` main branches, so that the next round's expected committed
/// tokens are largest for the same draft time.
///
/// All rows of a round are drafted in the same batched steps: with `rows`
/// rows, each gets `1 + ⌊(γ − 1) / cost(rows)⌋` tokens, where `cost(rows)`
/// is a `rows`-row step's measured cost in one-row steps. The next round
/// verifies the adopted row's tail (its tokens after the head), of which it
/// keeps on average `Σ_{i=1}^{n−1} α^i` (`alpha`: the chance a drafted
/// token is accepted). The plan maximizes
/// `(main_chance + Σ chosen chances) · kept(rows)` over the hedge count, at
/// most [`MAX_HEDGES`]; ties go to fewer hedges.
pub fn hedge_count(
    main_chance: f32,
    hedges: &[Hedge],
    branches: usize,
    gamma: usize,
    alpha: f64,
    cost: impl Fn(usize) -> f64,
) -> usize {
    let alpha = alpha.clamp(0.0, 0.999);
    let kept = |rows: usize| {
        let steps = gamma.saturating_sub(1) as f64 / cost(rows).max(1.0);
        let tail = steps.floor() as i32;
        (1..=tail).map(|i| alpha.powi(i)).sum::<f64>()
    };
    let mut best = (f64::from(main_chance) * kept(branches), 0);
    let mut chance = f64::from(main_chance);
    for (n, h) in hedges.iter().take(MAX_HEDGES).enumerate() {
        chance += f64::from(h.chance);
        let value = chance * kept(branches + n + 1);
        if value > best.0 + 1e-9 {
            best = (value, n + 1);
        }
    }
    best.1
}

/// The length of a serial chain to draft before a round that would verify
/// a lone token (a duodecoding round after a rejection or a branch miss):
/// the `γ` in `0..=max` that maximizes tokens per unit of time,
/// `(1 + α + … + α^γ) / (V(1 + γ) + c + γ·r)` — the round commits its
/// drawn token plus the chain's accepted prefix (each token accepted with
/// chance `alpha`), and costs a target forward over `1 + γ` tokens
/// (`verify_cost`: its cost in one-token forwards, `V(1) = 1`; ~1 on a GPU,
/// growing on a CPU) plus, the target idle meanwhile, the chain's fixed
/// cost `c` (`overhead`: the draft call's round trip, in forwards) and `γ`
/// draft steps of `ratio` forwards each. `γ = 0` is the lone round.
pub fn fallback_chain_len(
    alpha: f64,
    ratio: f64,
    overhead: f64,
    verify_cost: impl Fn(usize) -> f64,
    max: usize,
) -> usize {
    if !overhead.is_finite() || !ratio.is_finite() || ratio < 0.0 {
        return 0;
    }
    let (alpha, overhead) = (alpha.clamp(0.0, 1.0), overhead.max(0.0));
    let mut best = (1.0, 0);
    let (mut tokens, mut power) = (1.0, 1.0);
    for g in 1..=max {
        power *= alpha;
        tokens += power;
        let verify = verify_cost(1 + g);
        if !verify.is_finite() {
            break;
        }
        let rate = tokens / (verify.max(1.0) + overhead + g as f64 * ratio);
        if rate > best.0 + 1e-12 {
            best = (rate, g);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::Distribution;

    /// A distribution with the given probabilities on tokens 10, 11, ...
    fn dist(probs: &[f64]) -> Distribution {
        Distribution::from_weights(
            probs
                .iter()
                .enumerate()
                .map(|(i, &p)| (10 + i as u32, p))
                .collect(),
        )
    }

    #[test]
    fn default_and_clamping() {
        assert_eq!(BranchPolicy::default().max_branches, 4);
        assert_eq!(BranchPolicy::new(0).max_branches, 1);
        assert_eq!(BranchPolicy::new(20).max_branches, 8);
        assert_eq!(BranchPolicy { max_branches: 0 }.cap(), 1);
        assert_eq!(BranchPolicy { max_branches: 100 }.cap(), 8);
    }

    #[test]
    fn confident_draft_gets_one_branch() {
        let p = BranchPolicy::new(8);
        // θ = 0.9 · 0.9 = 0.81; no other candidate exceeds it.
        assert_eq!(p.branch_count(dist(&[0.9, 0.05, 0.05]).entries(), 0.9), 1);
        assert_eq!(p.branch_count(Distribution::point(3).entries(), 0.1), 1);
    }

    #[test]
    fn unsure_draft_counts_candidates_above_theta() {
        let p = BranchPolicy::new(8);
        // θ = 0.4 · 0.5 = 0.2: candidates 0.3 and 0.25 exceed it, 0.05 does not.
        let d = dist(&[0.4, 0.3, 0.25, 0.05]);
        assert_eq!(p.branch_count(d.entries(), 0.5), 3);
        // θ = 0.4 · 0.7 = 0.28: only 0.3 exceeds it.
        assert_eq!(p.branch_count(d.entries(), 0.7), 2);
        // Equal to θ is not above it: θ = 0.4 · 0.75 = 0.3.
        assert_eq!(p.branch_count(d.entries(), 0.75), 1);
    }

    #[test]
    fn count_is_capped() {
        // Ten equally likely tokens, p21 small: all ranks 2..8 exceed θ.
        let d = dist(&[0.1; 10]);
        assert_eq!(BranchPolicy::new(8).branch_count(d.entries(), 0.01), 8);
        assert_eq!(BranchPolicy::new(4).branch_count(d.entries(), 0.01), 4);
        assert_eq!(BranchPolicy::new(1).branch_count(d.entries(), 0.01), 1);
        assert_eq!(
            BranchPolicy { max_branches: 50 }.branch_count(d.entries(), 0.01),
            8
        );
    }

    #[test]
    fn fewer_candidates_than_eight() {
        let d = dist(&[0.5, 0.3, 0.2]);
        assert_eq!(BranchPolicy::new(8).branch_count(d.entries(), 0.1), 3);
        assert_eq!(
            BranchPolicy::new(8).branch_heads(d.entries(), 8),
            vec![10, 11, 12]
        );
    }

    #[test]
    fn odd_p21_values() {
        let d = dist(&[0.4, 0.3, 0.25, 0.05]);
        let p = BranchPolicy::new(8);
        assert_eq!(p.branch_count(d.entries(), f32::NAN), 1);
        assert_eq!(p.branch_count(d.entries(), 7.0), 1);
        assert_eq!(p.branch_count(d.entries(), -1.0), 4);
    }

    #[test]
    fn heads_are_top_k_most_likely_first() {
        let d = dist(&[0.1, 0.4, 0.2, 0.3]);
        let p = BranchPolicy::new(4);
        assert_eq!(p.branch_heads(d.entries(), 3), vec![11, 13, 12]);
        assert_eq!(p.branch_heads(d.entries(), 1), vec![11]);
        assert_eq!(p.branch_heads(d.entries(), 0), vec![11]);
        // k is capped by the policy.
        assert_eq!(
            BranchPolicy::new(2).branch_heads(d.entries(), 4),
            vec![11, 13]
        );
    }

    #[test]
    fn heads_are_distinct() {
        let d = Distribution::from_weights(vec![(5, 0.3), (5, 0.3), (6, 0.2), (7, 0.2)]);
        assert_eq!(
            BranchPolicy::new(8).branch_heads(d.entries(), 3),
            vec![5, 6, 7]
        );
    }

    #[test]
    fn hedges_rank_by_survival_times_candidate() {
        // Tail [1, 2]; the draft gave 1 0.6 (alt 7: 0.3), then 2 0.5 (alt 8: 0.4).
        let alts = vec![vec![(1, 0.6), (7, 0.3)], vec![(2, 0.5), (8, 0.4)]];
        let (h, survive) = rank_hedges(&[1, 2], &alts, &[]);
        assert!((survive - 0.3).abs() < 1e-6);
        assert_eq!(h.len(), 2);
        assert_eq!((h[0].anchor, h[0].head), (0, 7));
        assert!((h[0].chance - 0.3).abs() < 1e-6);
        assert_eq!((h[1].anchor, h[1].head), (1, 8));
        assert!((h[1].chance - 0.24).abs() < 1e-6);
        // The tail's own tokens are never hedges; unknown positions end it.
        let (h, _) = rank_hedges(&[1, 2, 3], &[vec![(1, 1.0)], vec![], vec![(9, 0.5)]], &[]);
        assert!(h.is_empty());
        assert!(rank_hedges(&[], &[], &[]).0.is_empty());
        // Measured acceptance moves the hedges to where rejections happen:
        // position 0 is always accepted, position 1 half the time.
        let (h, _) = rank_hedges(&[1, 2], &alts, &[Some(1.0), Some(0.5)]);
        assert_eq!((h[0].anchor, h[0].head), (1, 8));
        assert!((h[0].chance - 0.5 * 0.8).abs() < 1e-6, "{h:?}");
        assert_eq!(h[1].chance, 0.0);
    }

    #[test]
    fn hedge_count_follows_measured_step_costs() {
        let hedges: Vec<Hedge> = (0..10)
            .map(|i| Hedge {
                anchor: i,
                head: 100 + i as u32,
                chance: 0.1,
            })
            .collect();
        // Rows are free: every hedge (up to the cap) pays.
        assert_eq!(hedge_count(0.3, &hedges, 1, 9, 0.8, |_| 1.0), MAX_HEDGES);
        // Every extra row doubles the step: none pays.
        assert_eq!(hedge_count(0.3, &hedges, 1, 9, 0.8, |r| r as f64), 0);
        // No hedges offered, or no budget past the head: none.
        assert_eq!(hedge_count(0.3, &[], 1, 9, 0.8, |_| 1.0), 0);
        assert_eq!(hedge_count(0.3, &hedges, 1, 1, 0.8, |_| 1.0), 0);
        // Unlikely hedges at a mild cost: some but not all.
        let unlikely: Vec<Hedge> = hedges
            .iter()
            .map(|h| Hedge { chance: 0.02, ..*h })
            .collect();
        let n = hedge_count(0.3, &unlikely, 2, 9, 0.8, |r| 1.0 + 0.15 * (r - 1) as f64);
        assert!(n > 0 && n < MAX_HEDGES, "{n}");
    }

    #[test]
    fn fallback_chain_pays_only_when_drafting_is_cheap_and_accepted() {
        // A GPU-like target: a draft step is 1/20 of a forward.
        let flat = |_| 1.0;
        let g = fallback_chain_len(0.6, 0.05, 0.0, flat, 8);
        assert!((2..=6).contains(&g), "{g}");
        // Nothing is accepted: no chain.
        assert_eq!(fallback_chain_len(0.0, 0.05, 0.0, flat, 8), 0);
        // A draft step as dear as a forward: no chain.
        assert_eq!(fallback_chain_len(0.6, 1.0, 0.0, flat, 8), 0);
        // A CPU target, whose forward grows 12% a token, and a draft call
        // that costs a third of a forward to make (the small regime): no
        // chain; without the call's cost, one token.
        let cpu = |n: usize| 1.0 + 0.12 * (n - 1) as f64;
        assert_eq!(fallback_chain_len(0.55, 0.2, 0.35, cpu, 8), 0);
        assert_eq!(fallback_chain_len(0.55, 0.2, 0.0, cpu, 8), 1);
        // Always accepted, free: as long as allowed.
        assert_eq!(fallback_chain_len(1.0, 0.0, 0.0, flat, 8), 8);
        assert_eq!(fallback_chain_len(0.9, f64::NAN, 0.0, flat, 8), 0);
    }
}
