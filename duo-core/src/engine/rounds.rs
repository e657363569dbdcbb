//! The named steps of [`driver::run`](super::driver::run), one
//! generation's speculative loop: [`GenerationLoop::start`], then
//! [`GenerationLoop::round`] until the generation ends — each round
//! [`prepare_draft`](GenerationLoop::prepare_draft),
//! [`draft`](GenerationLoop::draft), [`verify`](GenerationLoop::verify),
//! [`emit`](GenerationLoop::emit), [`collect`](GenerationLoop::collect) and
//! [`advance`](GenerationLoop::advance) — then [`GenerationLoop::finish`].
//! There is no separate prefill: the first round's target feed is the
//! prompt.

use std::time::Instant;

use super::EngineError;
use super::drafter::{DraftJob, DraftTree};
use super::driver::{
    DEFAULT_MAX_HEDGES, DEFAULT_SPS_GAMMA, DraftSide, GenerateParams, Generation, Limits, Mode,
    Recovery, Sink, Stats, TargetSide,
};
use super::verifier::TargetVerdict;
use crate::speculative::budget::BudgetController;
use crate::speculative::policy::BranchPolicy;
use crate::speculative::round::{DraftSync, Round, RoundOutcome};
use crate::speculative::stop::{FinishReason, StopConfig, Terminator};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// The most a target forward over a round's tail may cost, in one-token
/// forwards, for the round to draft hedges (see
/// [`GenerationLoop::hedges_this_round`]).
const FLAT_VERIFY_LIMIT: f64 = 1.5;

/// Weight of each fallback chain's measured overhead.
const CHAIN_OVERHEAD_ALPHA: f64 = 0.3;

/// The loop's view of its draft's health.
struct DraftHealth {
    ready: bool,
    /// The draft holds no context: the next job must carry a full sync.
    fresh: bool,
}

impl DraftHealth {
    /// Handles a failed draft call: `Ok` to go on without this round's
    /// draft, `Err` to end the generation. A failure of the side (its
    /// worker gone, hung, or refusing a job: [`EngineError::Side`], of any
    /// kind) is recovered from; any other error ends the generation.
    fn failed(
        &mut self,
        d: &mut dyn DraftSide,
        e: EngineError,
        stats: &mut Stats,
    ) -> Result<(), EngineError> {
        if !matches!(e, EngineError::Side { .. }) {
            return Err(e);
        }
        let recovery = d.recover();
        tracing::warn!(error = %e, ?recovery, "draft failed: going on without it");
        stats.draft_failures += 1;
        match recovery {
            Recovery::GiveUp => Err(e),
            r => {
                self.ready = r == Recovery::Ready;
                self.fresh = true;
                Ok(())
            }
        }
    }
}

/// What the draft step leaves for the rest of its round.
struct Drafted {
    /// A tree already in hand: speculative mode's (its chain already the
    /// tail, so without branches).
    tree: Option<DraftTree>,
    /// A duodecoding job runs beside the target: collect it.
    running: bool,
}

/// One generation in progress: its two sides, the round state machine, the
/// stop rules and what has been emitted so far.
pub(super) struct GenerationLoop<'a> {
    target: &'a mut dyn TargetSide,
    draft: Option<&'a mut dyn DraftSide>,
    tokenizer: &'a Tokenizer,
    limits: &'a Limits,
    budget: &'a mut BudgetController,
    params: &'a GenerateParams,
    start: Instant,
    stats: Stats,
    round: Round,
    term: Terminator,
    decoder: IncrementalDecoder,
    policy: BranchPolicy,
    emitted: Vec<u32>,
    logprobs: Vec<f32>,
    text: String,
    gamma_sum: usize,
    draft_rounds: usize,
    first_round: bool,
    health: DraftHealth,
    /// The fixed cost of a duodecoding fallback chain beyond its draft
    /// steps (the draft call's round trip), in target forwards, measured.
    chain_overhead: crate::stats::Ema,
}

impl<'a> GenerationLoop<'a> {
    /// Sets a generation up (the request already validated). Invariant:
    /// nothing is committed or emitted yet; the round state machine holds
    /// the prompt, which the first round feeds the target whole (the
    /// prefill). A draft side that starts detached holds no context: once
    /// it attaches, its first job carries a full sync.
    pub(super) fn start(
        target: &'a mut dyn TargetSide,
        draft: Option<&'a mut dyn DraftSide>,
        tokenizer: &'a Tokenizer,
        limits: &'a Limits,
        budget: &'a mut BudgetController,
        prompt: Vec<u32>,
        params: &'a GenerateParams,
    ) -> Self {
        let start = Instant::now();
        let stats = Stats {
            mode: params.mode,
            prompt_tokens: prompt.len(),
            ..Stats::default()
        };
        let term = Terminator::new(StopConfig {
            max_new_tokens: params.max_new_tokens,
            eos: limits.eos.clone(),
            stop_sequences: params.stop.clone(),
        });
        let attached = draft.as_deref().is_none_or(|d| d.attached());
        Self {
            target,
            draft,
            tokenizer,
            limits,
            budget,
            params,
            start,
            stats,
            round: Round::new(prompt),
            term,
            decoder: IncrementalDecoder::new(),
            policy: BranchPolicy::new(params.max_branches),
            emitted: Vec::new(),
            logprobs: Vec::new(),
            text: String::new(),
            gamma_sum: 0,
            draft_rounds: 0,
            first_round: true,
            health: DraftHealth {
                ready: attached,
                fresh: !attached,
            },
            chain_overhead: crate::stats::Ema::new(CHAIN_OVERHEAD_ALPHA),
        }
    }

    /// One round: the draft's job goes out, the target verifies the pending
    /// tail and draws the next token, what is verified is streamed, the
    /// draft's tree is collected and the round state machine moves on.
    /// Returns why the generation ended, if it did. Invariant: only tokens
    /// the target verified reach `sink`; a failed draft costs this round's
    /// draft, never the generation, unless its side gives up.
    pub(super) fn round(
        &mut self,
        sink: &mut Sink<'_>,
    ) -> Result<Option<FinishReason>, EngineError> {
        let _round = tracing::debug_span!(
            "round",
            n = self.stats.rounds,
            tail = self.round.tail().len()
        )
        .entered();
        let remaining = self.term.remaining();
        // The draft drafts within its own context, which may be shorter
        // than the target's (the generation's limit).
        let draft_limit = self
            .draft
            .as_deref()
            .and_then(|d| d.context_len())
            .map_or(self.limits.context_len, |c| c.min(self.limits.context_len));
        let room = draft_limit.saturating_sub(self.round.draft_context_len());
        let keep = self.round.target_keep();
        let round_start = Instant::now();
        // 1. The draft: speculative mode drafts first and waits; duodecoding
        //    starts drafting and lets it run while the target works.
        let sync = self.prepare_draft();
        let drafted = self.draft(sync, remaining, room, round_start)?;
        // 2. The target verifies the pending tail and draws the next token.
        let verdict = self.verify(keep)?;
        // 3. Emit what is verified now, before waiting for the draft.
        let (committed, finish) = self.emit(&verdict, sink)?;
        // 4. Collect the draft's branches (unless the generation just ended)
        //    and move to the next round.
        let tree = self.collect(drafted, finish.is_none(), round_start)?;
        self.advance(verdict, tree, committed)?;
        Ok(finish)
    }

    /// Asks a draft that is not ready (detached, or failed earlier) to
    /// recover, then says what the draft must do first this round.
    /// Invariant: a draft that holds no context (`fresh`) gets the full
    /// sync; one that won't draft this round gets nothing to build.
    fn prepare_draft(&mut self) -> DraftSync {
        let mode = self.params.mode;
        if mode != Mode::Autoregressive
            && !self.health.ready
            && let Some(d) = self.draft.as_deref_mut()
        {
            self.health.ready = d.recover() == Recovery::Ready;
        }
        if mode == Mode::Autoregressive || !self.health.ready {
            DraftSync::default()
        } else if self.health.fresh {
            self.round.full_draft_sync()
        } else {
            self.round.draft_sync().clone()
        }
    }

    /// The draft's part before the target runs: speculative mode drafts a
    /// chain and waits for it (it becomes the tail the target verifies);
    /// duodecoding submits a job that runs while the target works — after
    /// a short serial chain first when the round would otherwise verify a
    /// lone token and such a chain pays ([`Self::fallback_chain_len`]). A
    /// draft that is not ready makes the round draftless. Invariant: γ
    /// leaves room for the target's own token within the tokens left and
    /// stays within the draft's context (`room`); γ = 0 drafts nothing.
    fn draft(
        &mut self,
        sync: DraftSync,
        remaining: usize,
        room: usize,
        round_start: Instant,
    ) -> Result<Drafted, EngineError> {
        let mut drafted = Drafted {
            tree: None,
            running: false,
        };
        let params = self.params;
        if params.mode == Mode::Autoregressive || self.draft.is_none() {
            return Ok(drafted);
        }
        if !self.health.ready {
            self.stats.draftless_rounds += 1;
            return Ok(drafted);
        }
        if params.mode == Mode::Speculative {
            let gamma = params
                .gamma
                .unwrap_or(DEFAULT_SPS_GAMMA)
                .min(remaining.saturating_sub(1))
                .min(room.saturating_sub(1));
            if gamma > 0 {
                drafted.tree = self.serial_chain(sync, gamma, round_start)?;
            }
            return Ok(drafted);
        }
        let mut sync = sync;
        let chain = self.fallback_chain_len(remaining, room);
        if chain > 0 {
            match self.serial_chain(sync, chain, round_start)? {
                Some(tree) => {
                    // What the chain cost beyond its draft steps, in forwards.
                    let wall = round_start.elapsed().as_secs_f64();
                    if let (Some(one), Some(step)) =
                        (self.budget.target_time(1), self.budget.draft_step_secs())
                        && one > 0.0
                    {
                        let steps = tree.forward_steps as f64 * step;
                        self.chain_overhead.update(((wall - steps) / one).max(0.0));
                    }
                    // The chain is the tail now; the draft holds C + chain.
                    self.stats.draft_busy_ms += tree.secs * 1e3;
                    self.stats.fallback_chains += 1;
                    sync = DraftSync {
                        adopt: None,
                        keep: self.round.draft_context_len(),
                        append: Vec::new(),
                    };
                }
                None if !self.health.ready => return Ok(drafted),
                None => sync = self.round.full_draft_sync(),
            }
        }
        // The controller balances γ draft steps against the target's
        // forward; the draft also spends one forward catching up on the
        // synced tokens, so it gets one step less.
        let gamma = params
            .gamma
            .unwrap_or_else(|| {
                self.budget
                    .choose_gamma(self.round.target_feed_len())
                    .saturating_sub(1)
                    .max(1)
            })
            .min(remaining.saturating_sub(self.round.tail().len() + 1))
            .min(room.saturating_sub(self.round.tail().len()));
        let max_hedges = self.hedges_this_round(gamma);
        let Some(d) = self.draft.as_deref_mut() else {
            return Ok(drafted);
        };
        if gamma > 0 {
            match d.submit(DraftJob {
                sync,
                gamma,
                policy: self.policy,
                first_verified: false,
                max_hedges,
            }) {
                Ok(()) => {
                    drafted.running = true;
                    self.gamma_sum += gamma;
                    *self.stats.gamma_hist.entry(gamma).or_default() += 1;
                    self.draft_rounds += 1;
                }
                Err(e) => self.health.failed(d, e, &mut self.stats)?,
            }
        }
        Ok(drafted)
    }

    /// Drafts a chain of `gamma` tokens and waits for it, the target idle,
    /// then makes it this round's tail (speculative mode's every round;
    /// duodecoding's fallback). Returns the drafting's tree without its
    /// branches (its costs still count), or `None` when the draft failed
    /// (the round goes on without it, the draft left to recover).
    fn serial_chain(
        &mut self,
        sync: DraftSync,
        gamma: usize,
        round_start: Instant,
    ) -> Result<Option<DraftTree>, EngineError> {
        let Some(d) = self.draft.as_deref_mut() else {
            return Ok(None);
        };
        let job = DraftJob {
            sync,
            gamma,
            policy: BranchPolicy::new(1),
            first_verified: true,
            max_hedges: 0,
        };
        let tree = match d.submit(job).and_then(|()| d.collect()) {
            Ok(tree) => tree,
            Err(e) => {
                self.health.failed(d, e, &mut self.stats)?;
                return Ok(None);
            }
        };
        let stats = &mut self.stats;
        self.health.fresh = false;
        // The chain becomes the tail below: its bytes count here.
        stats.draft_wire_bytes += tree.wire_bytes();
        stats.target_idle_ms += round_start.elapsed().as_secs_f64() * 1e3;
        self.gamma_sum += gamma;
        *stats.gamma_hist.entry(gamma).or_default() += 1;
        self.draft_rounds += 1;
        let mut chain = tree.branches.first().cloned().unwrap_or_default();
        chain.truncate(gamma);
        let mut qs = tree.proposals.first().cloned().unwrap_or_default();
        qs.truncate(chain.len());
        self.round.set_tail(chain, qs)?;
        // The chain became the tail: no branches for the next token.
        Ok(Some(DraftTree {
            branches: Vec::new(),
            anchors: Vec::new(),
            proposals: Vec::new(),
            ..tree
        }))
    }

    /// The hedges this round may draft: the request's `max_hedges` when it
    /// names one; else [`DEFAULT_MAX_HEDGES`] while the target verifies a
    /// tail of `gamma` tokens for about the cost of one (measured:
    /// `T(γ + 1) / T(1)` under [`FLAT_VERIFY_LIMIT`], a weight-bound
    /// target, as on a GPU), and none otherwise — on a target whose
    /// forward grows with the tokens (a CPU), hedges and their longer tails
    /// cost more than they bring (measured: ~10% slower on the bundled
    /// pair in the small regime). Before the target is measured: allowed.
    fn hedges_this_round(&self, gamma: usize) -> usize {
        if let Some(n) = self.params.max_hedges {
            return n;
        }
        match self.budget.verify_cost(gamma + 1) {
            Some(v) if v > FLAT_VERIFY_LIMIT => 0,
            _ => DEFAULT_MAX_HEDGES,
        }
    }

    /// The length of the serial chain a duodecoding round drafts before its
    /// forward, 0 for none: only when the round would verify nothing but
    /// its last committed token (a rejection or a branch miss left no
    /// pending tail; never the prefill), and as long as pays by
    /// [`fallback_chain_len`](crate::speculative::policy::fallback_chain_len)
    /// at this generation's measured acceptance and the measured cost of a
    /// draft step against the target's forward. Off with a fixed γ.
    fn fallback_chain_len(&self, remaining: usize, room: usize) -> usize {
        if self.first_round
            || !self.round.tail().is_empty()
            || self.params.gamma.is_some()
            || self.health.fresh
        {
            return 0;
        }
        let Some(ratio) = self.budget.draft_over_target(1) else {
            return 0;
        };
        let offered: usize = self.stats.tail_offered_by_pos.iter().sum();
        let accepted: usize = self.stats.tail_accepted_by_pos.iter().sum();
        // Laplace's rule: one accepted and one rejected token assumed.
        let alpha = (accepted as f64 + 1.0) / (offered as f64 + 2.0);
        let verify = |n| self.budget.verify_cost(n).unwrap_or(f64::INFINITY);
        let overhead = self.chain_overhead.get().unwrap_or(0.0);
        crate::speculative::policy::fallback_chain_len(
            alpha,
            ratio,
            overhead,
            verify,
            DEFAULT_SPS_GAMMA * 2,
        )
        .min(remaining.saturating_sub(1))
        .min(room.saturating_sub(1))
    }

    /// The target verifies the pending tail next to its logits and draws
    /// the next token. Invariant: the target's cache is rolled back to
    /// `keep` (the context it holds that is still committed) before it is
    /// fed; its verdict alone decides what is committed.
    fn verify(&mut self, keep: usize) -> Result<TargetVerdict, EngineError> {
        let verdict = self.target.verify(
            keep,
            &self.round.target_feed(),
            self.round.tail(),
            self.round.tail_proposals(),
        )?;
        self.stats.target_busy_ms += verdict.secs * 1e3;
        if self.params.mode == Mode::Speculative {
            self.stats.draft_idle_ms += verdict.secs * 1e3;
        }
        if !self.first_round {
            self.budget.observe_target(verdict.fed, verdict.secs);
        }
        Ok(verdict)
    }

    /// Commits what the verdict verified and streams it at once, before the
    /// draft is waited for. Returns the tokens the round commits and why
    /// the generation ends, if it does (EOS, a stop sequence, or no tokens
    /// left: length). Invariant: `sink` gets each verified token once, in
    /// order, none past the end; the text it gets adds up to the
    /// generation's text; `false` from it cancels the generation.
    fn emit(
        &mut self,
        verdict: &TargetVerdict,
        sink: &mut Sink<'_>,
    ) -> Result<(Vec<u32>, Option<FinishReason>), EngineError> {
        let committed = self.round.preview(&verdict.verdict)?;
        let tokenizer = self.tokenizer;
        let commit = self
            .term
            .commit(&committed, |t| self.decoder.push(tokenizer, t))?;
        let new = &committed[..commit.accepted];
        let new_logprobs = &verdict.logprobs[..verdict.logprobs.len().min(commit.accepted)];
        self.logprobs.extend_from_slice(new_logprobs);
        if self.stats.ttft_ms == 0.0 && !new.is_empty() {
            self.stats.ttft_ms = self.start.elapsed().as_secs_f64() * 1e3;
        }
        self.emitted.extend_from_slice(new);
        self.text.push_str(&commit.text);
        if (!commit.text.is_empty() || !new.is_empty()) && !sink(&commit.text, new, new_logprobs) {
            return Err(EngineError::Cancelled);
        }
        let mut finish = commit.finish;
        if finish.is_none() && self.term.remaining() == 0 {
            finish = Some(FinishReason::Length);
        }
        Ok((committed, finish))
    }

    /// The draft's tree for the next round: the running duodecoding job's,
    /// collected only while the generation goes on, or the one speculative
    /// mode already holds. Invariant: a failed collection leaves the next
    /// round without branches (and the draft to recover), never the output
    /// changed.
    fn collect(
        &mut self,
        drafted: Drafted,
        go_on: bool,
        round_start: Instant,
    ) -> Result<Option<DraftTree>, EngineError> {
        let mut tree = drafted.tree;
        if drafted.running
            && go_on
            && let Some(d) = self.draft.as_deref_mut()
        {
            let waited = Instant::now();
            let checked = d.collect().and_then(|t| {
                self.round
                    .check_branches(&t.branches, &t.anchors, &t.proposals)
                    .map(|()| t)
                    .map_err(|e| EngineError::Side {
                        side: "draft",
                        kind: crate::engine::ErrorKind::Internal,
                        message: format!("the draft sent a malformed tree: {e}"),
                    })
            });
            match checked {
                Ok(t) => {
                    self.health.fresh = false;
                    self.stats.target_idle_ms += waited.elapsed().as_secs_f64() * 1e3;
                    self.stats.draft_idle_ms +=
                        (round_start.elapsed().as_secs_f64() - t.secs).max(0.0) * 1e3;
                    tree = Some(t);
                }
                Err(e) => self.health.failed(d, e, &mut self.stats)?,
            }
        }
        Ok(tree)
    }

    /// Moves the round state machine on with the verdict and the draft's
    /// branches, and counts the round. Invariant: the state machine commits
    /// exactly the tokens [`Self::emit`] previewed, and everything emitted
    /// so far is a prefix of what it has committed.
    fn advance(
        &mut self,
        verdict: TargetVerdict,
        tree: Option<DraftTree>,
        committed: Vec<u32>,
    ) -> Result<(), EngineError> {
        if let Some(t) = &tree {
            self.stats.draft_busy_ms += t.secs * 1e3;
            self.stats.draft_wire_bytes += t.wire_bytes();
            if t.forward_steps > 0 && !self.first_round {
                self.budget
                    .observe_draft(t.tokens(), t.forward_steps, t.secs);
            }
        }
        let empty = DraftTree::default();
        let t = tree.as_ref().unwrap_or(&empty);
        let out =
            self.round
                .apply_anchored(verdict.verdict, &t.branches, &t.anchors, &t.proposals)?;
        debug_assert_eq!(out.committed, committed);
        // Only verified tokens are ever emitted: the output so far is a
        // prefix of what the round state machine committed.
        debug_assert!(
            self.round.generated().starts_with(&self.emitted),
            "an emitted token was not committed"
        );
        self.first_round = false;
        record_round(&mut self.stats, &out);
        Ok(())
    }

    /// Ends the generation: the decoder's held-back text (cut at a stop
    /// sequence) goes to `sink`, and the stats get their totals.
    /// Invariant: the generation's text is exactly what `sink` received,
    /// and its tokens exactly the ids it received.
    pub(super) fn finish(
        mut self,
        finish: Option<FinishReason>,
        sink: &mut Sink<'_>,
    ) -> Result<Generation, EngineError> {
        let tail_text = self.decoder.finish(self.tokenizer)?;
        let last = self.term.finish(&tail_text);
        if !last.text.is_empty() {
            self.text.push_str(&last.text);
            sink(&last.text, &[], &[]);
        }
        let total = self.start.elapsed().as_secs_f64();
        let stats = &mut self.stats;
        stats.new_tokens = self.emitted.len();
        stats.total_ms = total * 1e3;
        stats.tokens_per_s = self.emitted.len() as f64 / total.max(1e-9);
        stats.mean_accepted = self.emitted.len() as f64 / stats.rounds.max(1) as f64;
        stats.gamma_mean = self.gamma_sum as f64 / self.draft_rounds.max(1) as f64;
        if self.params.mode == Mode::Duodecoding {
            stats.budget = Some(self.budget.report());
        }
        tracing::info!(
            new_tokens = stats.new_tokens,
            rounds = stats.rounds,
            mean_accepted = stats.mean_accepted,
            tokens_per_s = stats.tokens_per_s,
            ttft_ms = stats.ttft_ms,
            "generation done"
        );
        Ok(Generation {
            tokens: self.emitted,
            text: self.text,
            logprobs: self.logprobs,
            finish_reason: last.finish.or(finish).unwrap_or(FinishReason::Length),
            stats: self.stats,
        })
    }
}

/// Adds one round's outcome to the stats. Invariant: `rounds` counts
/// target forwards, and per tail position accepted ≤ offered.
fn record_round(stats: &mut Stats, out: &RoundOutcome) {
    stats.rounds += 1;
    stats.drafted += out.drafted();
    stats.accepted += out.accepted();
    if out.branches > 0 {
        *stats.k_hist.entry(out.branches).or_default() += 1;
        match out.branch_hit {
            Some(j) => {
                stats.branch_hits += 1;
                stats.alt_branch_hits += usize::from(j > 0);
            }
            None if !out.rejected() => stats.branch_misses += 1,
            None => {}
        }
    }
    stats.rejections += usize::from(out.rejected());
    stats.hedges += out.hedges;
    stats.hedge_hits += usize::from(out.hedge_hit);
    stats.single_token_rounds += usize::from(out.committed.len() == 1);
    let kind = stats.round_kinds.entry(out.kind).or_default();
    kind.rounds += 1;
    kind.tokens += out.committed.len();
    if stats.tail_offered_by_pos.len() < out.tail_len {
        stats.tail_offered_by_pos.resize(out.tail_len, 0);
        stats.tail_accepted_by_pos.resize(out.tail_len, 0);
    }
    for i in 0..out.tail_len {
        stats.tail_offered_by_pos[i] += 1;
        stats.tail_accepted_by_pos[i] += usize::from(i < out.tail_accepted);
    }
    tracing::debug!(
        committed = out.committed.len(),
        tail_accepted = out.tail_accepted,
        tail_len = out.tail_len,
        branches = out.branches,
        branch_hit = ?out.branch_hit,
        hedges = out.hedges,
        hedge_hit = out.hedge_hit,
        kind = out.kind.as_str(),
        "round done"
    );
}
