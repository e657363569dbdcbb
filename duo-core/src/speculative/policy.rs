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
}
