//! The DuoDecoding round state machine (docs/architecture.md, "The algorithm"), pure.
//!
//! State between rounds: the committed tokens `C` (prompt + verified output)
//! and an optional *pending branch*: its head is `C`'s last token (already
//! verified) and its `tail` is unverified. Each round:
//!
//! - the **target** feeds [`Round::target_feed`] — `C[target_len..]` plus
//!   the tail (post-verify mode; with an empty tail this is pre-verify) — and
//!   returns one distribution per fed token;
//! - the **draft**, at the same time, applies [`Round::draft_sync`] (so its
//!   context becomes `C + tail`) and drafts branches continuing from there.
//!
//! [`Round::resolve`] then verifies the tail on the target's distributions,
//! draws the next token, picks the branch whose head equals it (that branch
//! becomes the new pending branch) and computes what each side keeps. The
//! same machine runs all three modes: autoregressive (no draft), speculative
//! (the draft's chain is set as the tail *before* the target runs, via
//! [`Round::set_tail`]) and duodecoding (draft and target concurrently).
//!
//! Invariants (checked in debug builds): `C` only grows; every token in `C`
//! after the prompt was emitted by a verification rule, so no unverified
//! draft token is ever committed; after `resolve` the target's cache must
//! hold exactly `C.len() - 1` tokens ([`Round::target_keep`]).

use serde::Serialize;

use super::verify::{
    ChainVerdict, VerifyError, choose_branch, verify_deterministic, verify_sampled,
};
use crate::sampling::{Distribution, Rng};

/// How the draft must change its state before drafting: optionally adopt
/// branch `adopt` of its previous drafts (its context then ends with that
/// branch), then keep the first `keep` tokens of its context, then append
/// `append`. Afterwards its context equals `C + tail`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct DraftSync {
    pub adopt: Option<usize>,
    pub keep: usize,
    pub append: Vec<u32>,
}

/// What one round did, for stats and tests.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct RoundOutcome {
    /// Tokens committed this round, in order (accepted tail, then the drawn token).
    pub committed: Vec<u32>,
    /// Length of the tail that was verified.
    pub tail_len: usize,
    /// Tail tokens accepted.
    pub tail_accepted: usize,
    /// Number of branches the draft offered for the next token.
    pub branches: usize,
    /// The branch whose head matched the drawn token, if any.
    pub branch_hit: Option<usize>,
    /// Of `branches`, the hedges: branches anchored inside the tail (a
    /// likely correction at a position the tail may be rejected at).
    pub hedges: usize,
    /// The matched branch was a hedge: the tail was rejected at its anchor
    /// and the target drew its head there, so the next round verifies the
    /// hedge's tail instead of a lone token.
    pub hedge_hit: bool,
    /// Where this round's tail came from.
    pub kind: RoundKind,
}

/// Where a round's tail came from: what the target verified besides the
/// last committed token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundKind {
    /// No tail: the target feeds the prompt (the first round) or the one
    /// token a rejection or a branch miss left (pre-verify).
    #[default]
    Lone,
    /// The tail of a branch drafted after the whole previous tail.
    Branch,
    /// The tail of a hedge adopted after a rejection.
    Hedge,
    /// Speculative mode's chain, drafted before the target ran.
    Chain,
}

impl RoundKind {
    /// Every kind, in a fixed order (for metrics and reports).
    pub const ALL: [RoundKind; 4] = [Self::Lone, Self::Branch, Self::Hedge, Self::Chain];

    /// The kind named `name` ([`Self::as_str`]'s spelling), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The kind's name, as in metrics labels and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lone => "lone",
            Self::Branch => "branch",
            Self::Hedge => "hedge",
            Self::Chain => "chain",
        }
    }
}

impl RoundOutcome {
    /// Draft tokens the target verified this round: the tail. (A branch's
    /// head is not counted: it is matched against the target's own draw,
    /// which the round commits whether or not a branch matched it.)
    pub fn drafted(&self) -> usize {
        self.tail_len
    }

    /// Draft tokens the target accepted: the accepted tail. Every round
    /// commits these plus its own drawn token, so over a generation
    /// `rounds + accepted` is the tokens committed, in every mode.
    pub fn accepted(&self) -> usize {
        self.tail_accepted
    }

    /// True when a tail token was rejected.
    pub fn rejected(&self) -> bool {
        self.tail_accepted < self.tail_len
    }
}

/// Errors of the state machine: a driver broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoundError {
    #[error(
        "the target returned {got} distributions; the round fed {fed} tokens and needs at least {needed}"
    )]
    TooFewDistributions {
        got: usize,
        fed: usize,
        needed: usize,
    },
    #[error("verdict accepts {accepted} tokens of a {tail}-token tail")]
    Verdict { accepted: usize, tail: usize },
    #[error("a branch is empty")]
    EmptyBranch,
    #[error(
        "branch {branch}: anchor {anchor} {why} (the tail has {tail} tokens; an anchor is a \
         tail position, and a hedge's head must differ from the tail token it replaces)"
    )]
    Anchor {
        branch: usize,
        anchor: usize,
        tail: usize,
        why: &'static str,
    },
    #[error("set_tail is only allowed on a round with no pending tail")]
    TailAlreadySet,
    #[error("{got} proposals for {tokens} drafted tokens (give one per token, or none)")]
    Proposals { got: usize, tokens: usize },
    #[error(transparent)]
    Verify(#[from] VerifyError),
}

/// The per-generation round state.
#[derive(Debug, Clone)]
pub struct Round {
    committed: Vec<u32>,
    prompt_len: usize,
    tail: Vec<u32>,
    /// The proposals the tail's tokens were sampled from (one per tail
    /// token), or empty when they were chosen deterministically.
    tail_q: Vec<Distribution>,
    target_len: usize,
    draft_sync: DraftSync,
    /// Where the tail came from.
    tail_kind: RoundKind,
}

impl Round {
    /// A generation over `prompt` (must be non-empty; the driver validates).
    /// Neither side has seen anything yet: the first round's target feed is
    /// the whole prompt (prefill), and the draft is told to append it.
    pub fn new(prompt: Vec<u32>) -> Self {
        let draft_sync = DraftSync {
            adopt: None,
            keep: 0,
            append: prompt.clone(),
        };
        Self {
            prompt_len: prompt.len(),
            committed: prompt,
            tail: Vec::new(),
            tail_q: Vec::new(),
            target_len: 0,
            draft_sync,
            tail_kind: RoundKind::Lone,
        }
    }

    /// Prompt plus verified output.
    pub fn committed(&self) -> &[u32] {
        &self.committed
    }

    /// Verified output only.
    pub fn generated(&self) -> &[u32] {
        &self.committed[self.prompt_len..]
    }

    /// The pending branch's unverified tail.
    pub fn tail(&self) -> &[u32] {
        &self.tail
    }

    /// The proposals the tail was sampled from (one per tail token), or
    /// empty when it was drafted deterministically: verification then uses
    /// `verify_sampled` instead of `verify_deterministic`.
    pub fn tail_proposals(&self) -> &[Distribution] {
        &self.tail_q
    }

    /// Tokens the target must feed this round (never empty).
    pub fn target_feed(&self) -> Vec<u32> {
        let mut feed = self.committed[self.target_len..].to_vec();
        feed.extend_from_slice(&self.tail);
        feed
    }

    /// `target_feed().len()`, without building the feed.
    pub fn target_feed_len(&self) -> usize {
        self.committed.len() - self.target_len + self.tail.len()
    }

    /// How many tokens the target's cache must keep after `resolve`
    /// (everything committed but the last token, which it feeds next round).
    pub fn target_keep(&self) -> usize {
        self.target_len
    }

    /// What the draft must do before drafting this round.
    pub fn draft_sync(&self) -> &DraftSync {
        &self.draft_sync
    }

    /// A sync for a draft that holds nothing (a fresh worker after a
    /// failover): append all of `C + tail`. Equivalent to
    /// [`Self::draft_sync`] for the draft's resulting context.
    pub fn full_draft_sync(&self) -> DraftSync {
        let mut append = self.committed.clone();
        append.extend_from_slice(&self.tail);
        DraftSync {
            adopt: None,
            keep: 0,
            append,
        }
    }

    /// The draft's context after applying [`Self::draft_sync`]: `C + tail`.
    pub fn draft_context_len(&self) -> usize {
        self.committed.len() + self.tail.len()
    }

    /// Speculative (sequential) mode: the draft's chain, drafted from `C`,
    /// becomes this round's tail, to be verified by the target feed, with
    /// the proposals its tokens were sampled from (one per token, or none
    /// for a deterministic chain). The draft's context now ends with the
    /// chain, which `resolve` rolls back as needed.
    pub fn set_tail(
        &mut self,
        chain: Vec<u32>,
        proposals: Vec<Distribution>,
    ) -> Result<(), RoundError> {
        if !self.tail.is_empty() {
            return Err(RoundError::TailAlreadySet);
        }
        if !proposals.is_empty() && proposals.len() != chain.len() {
            return Err(RoundError::Proposals {
                got: proposals.len(),
                tokens: chain.len(),
            });
        }
        self.tail_kind = if chain.is_empty() {
            RoundKind::Lone
        } else {
            RoundKind::Chain
        };
        self.tail = chain;
        self.tail_q = proposals;
        Ok(())
    }

    /// Verifies this round on the target's distributions for the fed tokens
    /// (`dists[i]` follows fed token i; only the last `tail.len() + 1` are
    /// used) — with `verify_sampled` when the tail came with proposals —
    /// then applies the verdict (see [`Self::apply`]).
    pub fn resolve(
        &mut self,
        dists: &[Distribution],
        branches: &[Vec<u32>],
        proposals: &[Vec<Distribution>],
        rng: &mut Rng,
    ) -> Result<RoundOutcome, RoundError> {
        let m = self.tail.len();
        let fed = self.committed.len() - self.target_len + m;
        if dists.len() < m + 1 || dists.len() > fed {
            return Err(RoundError::TooFewDistributions {
                got: dists.len(),
                fed,
                needed: m + 1,
            });
        }
        let target = &dists[dists.len() - m - 1..];
        let verdict = if self.tail_q.is_empty() {
            verify_deterministic(target, &self.tail, rng)?
        } else {
            verify_sampled(target, &self.tail, &self.tail_q, rng)?
        };
        self.apply(verdict, branches, proposals)
    }

    /// The tokens [`Self::apply`] would commit for `verdict` (accepted tail,
    /// then `next`), without changing anything: callers stream verified
    /// tokens out before the draft's branches arrive.
    pub fn preview(&self, verdict: &ChainVerdict) -> Result<Vec<u32>, RoundError> {
        if verdict.accepted > self.tail.len() {
            return Err(RoundError::Verdict {
                accepted: verdict.accepted,
                tail: self.tail.len(),
            });
        }
        let mut out = self.tail[..verdict.accepted].to_vec();
        out.push(verdict.next);
        Ok(out)
    }

    /// Applies a verification verdict on this round's tail (computed next to
    /// the target's logits, locally or in the target service) and the
    /// draft's `branches` for the token after the tail (empty in
    /// autoregressive and speculative mode; heads distinct) with their
    /// `proposals` (one per branch, each one per token; or none when drafted
    /// deterministically): commits the accepted tail and `next`, picks the
    /// branch headed by `next` as the new pending branch (its head matched
    /// the target's own draw; the rest, with its proposals, is the new
    /// tail), and computes what each side keeps. On error nothing changes.
    /// The same as [`Self::apply_anchored`] with every branch anchored at
    /// the end of the tail.
    pub fn apply(
        &mut self,
        verdict: ChainVerdict,
        branches: &[Vec<u32>],
        proposals: &[Vec<Distribution>],
    ) -> Result<RoundOutcome, RoundError> {
        self.apply_anchored(verdict, branches, &[], proposals)
    }

    /// Checks the draft's branches for this round before they are used:
    /// none empty; `anchors` empty (every branch after the whole tail) or
    /// one per branch (`None`: after the whole tail), each at most the
    /// tail's length; a hedge (anchor inside the tail) headed by a token
    /// other than the tail's there; no two branches with the same anchor
    /// and head; `proposals` empty or one list per branch, one per token. A tree that fails is its draft
    /// worker's fault: the caller drops it (the round goes on without
    /// branches), never the generation.
    pub fn check_branches(
        &self,
        branches: &[Vec<u32>],
        anchors: &[Option<usize>],
        proposals: &[Vec<Distribution>],
    ) -> Result<(), RoundError> {
        let m = self.tail.len();
        if branches.iter().any(Vec::is_empty) {
            return Err(RoundError::EmptyBranch);
        }
        if !proposals.is_empty()
            && (proposals.len() != branches.len()
                || proposals
                    .iter()
                    .zip(branches)
                    .any(|(q, b)| q.len() != b.len()))
        {
            return Err(RoundError::Proposals {
                got: proposals.iter().map(Vec::len).sum(),
                tokens: branches.iter().map(Vec::len).sum(),
            });
        }
        if anchors.is_empty() {
            return Ok(());
        }
        let bad = |branch: usize, anchor: usize, why| RoundError::Anchor {
            branch,
            anchor,
            tail: m,
            why,
        };
        if anchors.len() != branches.len() {
            return Err(bad(
                anchors.len(),
                0,
                "list does not give one anchor per branch",
            ));
        }
        let mut seen = std::collections::HashSet::with_capacity(branches.len());
        for (j, (a, b)) in anchors.iter().zip(branches).enumerate() {
            let a = a.unwrap_or(m);
            if a > m {
                return Err(bad(j, a, "is past the end of the tail"));
            }
            if a < m && b[0] == self.tail[a] {
                return Err(bad(j, a, "heads a hedge with the tail's own token"));
            }
            if !seen.insert((a, b[0])) {
                return Err(bad(j, a, "repeats another branch's anchor and head"));
            }
        }
        Ok(())
    }

    /// [`Self::apply`] with each branch's anchor: branch `j` continues
    /// `C + tail[..a]` for `anchors[j] = Some(a)` (the whole tail for
    /// `None`, or when `anchors` is empty). The pending branch becomes the
    /// one anchored where the tail stopped being accepted and headed by the
    /// target's draw there: after
    /// a rejection at `a`, a *hedge* anchored at `a`; after a fully
    /// accepted tail, a branch anchored at its end. Lossless either way:
    /// what is committed is the verdict's alone, and the adopted branch's
    /// tail is verified next round like any tail. Errors as
    /// [`Self::check_branches`]; on error nothing changes.
    pub fn apply_anchored(
        &mut self,
        verdict: ChainVerdict,
        branches: &[Vec<u32>],
        anchors: &[Option<usize>],
        proposals: &[Vec<Distribution>],
    ) -> Result<RoundOutcome, RoundError> {
        let ChainVerdict { accepted, next } = verdict;
        let m = self.tail.len();
        if accepted > m {
            return Err(RoundError::Verdict { accepted, tail: m });
        }
        self.check_branches(branches, anchors, proposals)?;
        let anchor = |j: usize| anchors.get(j).copied().flatten().unwrap_or(m);
        let old_len = self.committed.len();
        let tail = std::mem::take(&mut self.tail);
        self.tail_q.clear();
        let mut committed_now = tail[..accepted].to_vec();
        committed_now.push(next);
        self.committed.extend_from_slice(&committed_now);
        self.target_len = self.committed.len() - 1;
        // The branches anchored where the tail stopped: their heads are
        // distinct (checked), so the target's draw picks at most one.
        let candidates: Vec<usize> = (0..branches.len())
            .filter(|&j| anchor(j) == accepted)
            .collect();
        let heads: Vec<u32> = candidates.iter().map(|&j| branches[j][0]).collect();
        let hit = choose_branch(&heads, next).map(|i| candidates[i]);
        let hedges = (0..branches.len()).filter(|&j| anchor(j) < m).count();
        let kind = self.tail_kind;
        self.tail_kind = RoundKind::Lone;
        match hit {
            Some(j) => {
                self.tail_kind = if anchor(j) < m {
                    RoundKind::Hedge
                } else {
                    RoundKind::Branch
                };
                self.tail = branches[j][1..].to_vec();
                if let Some(q) = proposals.get(j) {
                    self.tail_q = q[1..].to_vec();
                }
                self.draft_sync = DraftSync {
                    adopt: Some(j),
                    keep: self.committed.len() + self.tail.len(),
                    append: Vec::new(),
                };
            }
            None => {
                self.draft_sync = DraftSync {
                    adopt: None,
                    keep: old_len + accepted,
                    append: vec![next],
                };
            }
        }
        debug_assert!(
            self.committed.len() > old_len,
            "committed length only grows"
        );
        debug_assert_eq!(
            self.draft_context_len(),
            self.committed.len() + self.tail.len()
        );
        Ok(RoundOutcome {
            committed: committed_now,
            tail_len: m,
            tail_accepted: accepted,
            branches: branches.len(),
            branch_hit: hit,
            hedges,
            hedge_hit: hit.is_some_and(|j| anchor(j) < m),
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::rng_from_seed;

    fn greedy(tokens: &[u32]) -> Vec<Distribution> {
        tokens.iter().map(|&t| Distribution::point(t)).collect()
    }

    #[test]
    fn full_sync_rebuilds_the_same_draft_context() {
        let mut r = Round::new(vec![1, 2, 3]);
        let d = greedy(&[9, 9, 10]);
        r.resolve(&d, &[vec![10, 20, 21]], &[], &mut rng_from_seed(0))
            .unwrap();
        let full = r.full_draft_sync();
        assert_eq!(full.adopt, None);
        assert_eq!(full.keep, 0);
        assert_eq!(full.append, vec![1, 2, 3, 10, 20, 21]);
        assert_eq!(full.append.len(), r.draft_context_len());
    }

    #[test]
    fn prefill_round_commits_first_token_and_picks_matching_branch() {
        let mut r = Round::new(vec![1, 2, 3]);
        assert_eq!(r.target_feed(), vec![1, 2, 3]);
        assert_eq!(r.draft_sync().append, vec![1, 2, 3]);
        // Target's distributions for the 3 fed tokens; the last says 10.
        let d = greedy(&[9, 9, 10]);
        let out = r
            .resolve(
                &d,
                &[vec![11, 12], vec![10, 20, 21]],
                &[],
                &mut rng_from_seed(0),
            )
            .unwrap();
        assert_eq!(out.committed, vec![10]);
        assert_eq!(out.branch_hit, Some(1));
        assert_eq!(r.committed(), &[1, 2, 3, 10]);
        assert_eq!(r.tail(), &[20, 21]);
        assert_eq!(r.target_keep(), 3);
        assert_eq!(r.target_feed(), vec![10, 20, 21]); // post-verify
        assert_eq!(
            r.draft_sync(),
            &DraftSync {
                adopt: Some(1),
                keep: 6,
                append: vec![]
            }
        );
    }

    #[test]
    fn all_accepted_then_branch_miss_goes_pre_verify() {
        let mut r = Round::new(vec![1]);
        r.resolve(&greedy(&[5]), &[vec![5, 6, 7]], &[], &mut rng_from_seed(0))
            .unwrap();
        assert_eq!(r.target_feed(), vec![5, 6, 7]);
        // Target agrees with 6 and 7, then draws 8; the new branches start with 30/31.
        let out = r
            .resolve(
                &greedy(&[6, 7, 8]),
                &[vec![30, 1], vec![31]],
                &[],
                &mut rng_from_seed(0),
            )
            .unwrap();
        assert_eq!(out.committed, vec![6, 7, 8]);
        assert_eq!(
            (out.tail_len, out.tail_accepted, out.branch_hit),
            (2, 2, None)
        );
        assert_eq!(out.drafted(), 2);
        assert_eq!(out.accepted(), 2);
        assert!(r.tail().is_empty());
        assert_eq!(r.committed(), &[1, 5, 6, 7, 8]);
        assert_eq!(r.target_keep(), 4);
        assert_eq!(r.target_feed(), vec![8]);
        // Draft context was C_old + tail = [1,5,6,7]: keep all, append 8.
        assert_eq!(
            r.draft_sync(),
            &DraftSync {
                adopt: None,
                keep: 4,
                append: vec![8]
            }
        );
    }

    #[test]
    fn rejection_at_each_position_rolls_back_both_sides() {
        for reject_at in 0..3 {
            let mut r = tail_678();
            let mut target_says = vec![6, 7, 8, 9];
            target_says[reject_at] = 99;
            let out = r
                .resolve(
                    &greedy(&target_says),
                    &[vec![40], vec![41]],
                    &[],
                    &mut rng_from_seed(0),
                )
                .unwrap();
            assert_eq!(out.tail_accepted, reject_at);
            assert!(out.rejected());
            assert_eq!(out.branch_hit, None, "branches assumed the whole tail");
            let mut want = vec![6, 7, 8][..reject_at].to_vec();
            want.push(99);
            assert_eq!(out.committed, want);
            assert_eq!(r.target_keep(), 2 + reject_at);
            assert_eq!(r.target_feed(), vec![99]);
            assert_eq!(
                r.draft_sync(),
                &DraftSync {
                    adopt: None,
                    keep: 2 + reject_at,
                    append: vec![99]
                }
            );
        }
    }

    #[test]
    fn speculative_mode_sets_chain_as_tail() {
        let mut r = Round::new(vec![1, 2]);
        r.resolve(&greedy(&[0, 3]), &[], &[], &mut rng_from_seed(0))
            .unwrap(); // prefill, AR-style
        assert_eq!(r.committed(), &[1, 2, 3]);
        r.set_tail(vec![4, 5, 6], vec![]).unwrap();
        assert!(r.set_tail(vec![1], vec![]).is_err());
        assert_eq!(r.target_feed(), vec![3, 4, 5, 6]);
        assert_eq!(r.target_feed_len(), 4);
        let out = r
            .resolve(&greedy(&[4, 5, 6, 7]), &[], &[], &mut rng_from_seed(0))
            .unwrap();
        assert_eq!(out.committed, vec![4, 5, 6, 7]);
        assert_eq!(r.target_keep(), 6);
        assert_eq!(r.draft_sync().keep, 6);
    }

    #[test]
    fn protocol_errors_are_reported() {
        let mut r = Round::new(vec![1]);
        r.resolve(&greedy(&[5]), &[vec![5, 6, 7]], &[], &mut rng_from_seed(0))
            .unwrap();
        assert!(matches!(
            r.resolve(&greedy(&[6]), &[], &[], &mut rng_from_seed(0)),
            Err(RoundError::TooFewDistributions { .. })
        ));
        assert_eq!(
            r.resolve(&greedy(&[6, 7, 8]), &[vec![]], &[], &mut rng_from_seed(0)),
            Err(RoundError::EmptyBranch)
        );
        // A failed resolve changed nothing.
        assert_eq!(r.tail(), &[6, 7]);
        assert_eq!(r.committed(), &[1, 5]);
    }

    /// A round with tail [6, 7, 8] after prompt [1] and head 5.
    fn tail_678() -> Round {
        let mut r = Round::new(vec![1]);
        r.resolve(
            &greedy(&[5]),
            &[vec![5, 6, 7, 8]],
            &[],
            &mut rng_from_seed(0),
        )
        .unwrap();
        assert_eq!(r.tail(), &[6, 7, 8]);
        r
    }

    /// Hedges at every tail position (heads 90 + a, continuing with a + 1
    /// tokens) and two branches after the whole tail (heads 40, 41).
    fn hedged_offer() -> (Vec<Vec<u32>>, Vec<Option<usize>>) {
        let mut branches = vec![vec![40, 1], vec![41, 2, 3]];
        let mut anchors = vec![None, None];
        for a in 0..3u32 {
            let mut b = vec![90 + a];
            b.extend(std::iter::repeat_n(70 + a, a as usize + 1));
            branches.push(b);
            anchors.push(Some(a as usize));
        }
        (branches, anchors)
    }

    #[test]
    fn every_verdict_meets_every_anchor() {
        let (branches, anchors) = hedged_offer();
        // Rejected at a, the target drawing the hedge's head there: the
        // hedge becomes the pending branch.
        for a in 0..3usize {
            let mut r = tail_678();
            let next = 90 + a as u32;
            let out = r
                .apply_anchored(ChainVerdict { accepted: a, next }, &branches, &anchors, &[])
                .unwrap();
            let mut want = [6, 7, 8][..a].to_vec();
            want.push(next);
            assert_eq!(out.committed, want);
            assert_eq!(out.branch_hit, Some(2 + a));
            assert!(out.hedge_hit && out.rejected());
            assert_eq!((out.hedges, out.kind), (3, RoundKind::Branch));
            assert_eq!(r.tail(), &vec![70 + a as u32; a + 1][..]);
            assert_eq!(r.committed().len(), 2 + a + 1);
            assert_eq!(
                r.draft_sync(),
                &DraftSync {
                    adopt: Some(2 + a),
                    keep: r.committed().len() + a + 1,
                    append: vec![]
                }
            );
            assert_eq!(r.target_feed(), {
                let mut f = vec![next];
                f.extend(vec![70 + a as u32; a + 1]);
                f
            });
            // The next round's tail is the hedge's: its kind says so.
            let out = r
                .apply_anchored(
                    ChainVerdict {
                        accepted: 0,
                        next: 3,
                    },
                    &[],
                    &[],
                    &[],
                )
                .unwrap();
            assert_eq!(out.kind, RoundKind::Hedge);
            // A hedge of another position, or another head: no hit.
            for (acc, next) in [(a, 99), ((a + 1) % 3, next)] {
                let mut r = tail_678();
                let out = r
                    .apply_anchored(
                        ChainVerdict {
                            accepted: acc,
                            next,
                        },
                        &branches,
                        &anchors,
                        &[],
                    )
                    .unwrap();
                assert_eq!(out.branch_hit, None, "accepted {acc}, next {next}");
                assert!(!out.hedge_hit);
                assert!(r.tail().is_empty());
                assert_eq!(r.draft_sync().append, vec![next]);
            }
        }
        // The whole tail accepted: a branch after it, never a hedge.
        for (next, hit) in [(41, Some(1)), (40, Some(0)), (90, None), (50, None)] {
            let mut r = tail_678();
            let out = r
                .apply_anchored(ChainVerdict { accepted: 3, next }, &branches, &anchors, &[])
                .unwrap();
            assert_eq!(out.branch_hit, hit, "next {next}");
            assert!(!out.hedge_hit);
            assert_eq!(out.committed, vec![6, 7, 8, next]);
        }
    }

    #[test]
    fn malformed_anchors_are_refused_and_change_nothing() {
        let v = ChainVerdict {
            accepted: 1,
            next: 9,
        };
        for (branches, anchors) in [
            (vec![vec![9]], vec![Some(4)]),                      // past the tail
            (vec![vec![7]], vec![Some(1)]),                      // the tail's own token
            (vec![vec![9], vec![9, 1]], vec![Some(1), Some(1)]), // repeated
            (vec![vec![9], vec![10]], vec![Some(1)]),            // one anchor for two
        ] {
            let mut r = tail_678();
            let err = r.apply_anchored(v, &branches, &anchors, &[]).unwrap_err();
            assert!(matches!(err, RoundError::Anchor { .. }), "{err}");
            assert!(err.to_string().contains("anchor"), "{err}");
            assert_eq!(r.tail(), &[6, 7, 8]);
            assert_eq!(r.committed(), &[1, 5]);
        }
        // Some(len) is the end of the tail, as None.
        let mut r = tail_678();
        let out = r
            .apply_anchored(
                ChainVerdict {
                    accepted: 3,
                    next: 9,
                },
                &[vec![9, 1]],
                &[Some(3)],
                &[],
            )
            .unwrap();
        assert_eq!(
            (out.branch_hit, out.hedge_hit, out.hedges),
            (Some(0), false, 0)
        );
    }
}
