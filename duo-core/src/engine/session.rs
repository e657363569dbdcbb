//! One generation's speculative loop, for all three modes, over two seams:
//! [`TargetSide`] and [`DraftSide`]. The in-process engine implements them
//! with local models and a draft thread; the orchestrator implements them
//! with gRPC streams. The loop is the same, so the services run exactly the
//! algorithm the in-process tests prove lossless.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::EngineError;
use super::drafter::{DraftJob, DraftTree};
use super::verifier::TargetVerdict;
use crate::sampling::{Distribution, SamplingParams};
use crate::spec::budget::{BudgetController, BudgetReport};
use crate::spec::policy::BranchPolicy;
use crate::spec::round::{DraftSync, Round};
use crate::spec::stop::{FinishReason, StopConfig, Terminator};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// Decoding mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Target only, one token per forward.
    Autoregressive,
    /// Classic speculative decoding: draft γ tokens, then verify; sequential.
    Speculative,
    /// Draft and target at the same time (DuoDecoding).
    #[default]
    Duodecoding,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "autoregressive" | "ar" => Ok(Mode::Autoregressive),
            "speculative" | "sps" => Ok(Mode::Speculative),
            "duodecoding" | "duo" => Ok(Mode::Duodecoding),
            _ => Err(format!(
                "unknown mode {s:?}: use duodecoding, speculative or autoregressive"
            )),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Autoregressive => "autoregressive",
            Mode::Speculative => "speculative",
            Mode::Duodecoding => "duodecoding",
        })
    }
}

/// Per-generation settings.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    pub stop: Vec<String>,
    pub mode: Mode,
    /// Fixed draft budget; `None` lets the budget controller choose
    /// (speculative mode then uses [`DEFAULT_SPS_GAMMA`]).
    pub gamma: Option<usize>,
    /// Most branches per round (1 disables multi-sequence drafting).
    pub max_branches: usize,
    /// Return the target's log-probabilities of the emitted tokens.
    pub logprobs: bool,
    /// At temperature > 0, draft by sampling from the draft's own processed
    /// distribution and verify with `min(1, p/q)` (the default), or draft
    /// greedily (point-mass proposals; accepted with probability `p(x)`).
    /// Either way the output follows the target's distribution exactly.
    pub greedy_drafts: bool,
}

/// The context a model is taken to have when neither its graph nor its
/// config.json declares one.
pub const DEFAULT_CONTEXT_LEN: usize = 2048;

/// γ for speculative mode when none is given.
pub const DEFAULT_SPS_GAMMA: usize = 4;
/// Largest γ a request may ask for.
pub const MAX_GAMMA: usize = 64;

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: SamplingParams::greedy(),
            seed: 0,
            stop: Vec::new(),
            mode: Mode::Duodecoding,
            gamma: None,
            max_branches: 4,
            logprobs: false,
            greedy_drafts: false,
        }
    }
}

/// Per-generation statistics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub mode: Mode,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Target forward passes.
    pub rounds: usize,
    /// Draft tokens put to verification (tail tokens plus head slots).
    pub drafted: usize,
    /// Draft tokens that became output.
    pub accepted: usize,
    /// Committed tokens per target forward (τ).
    pub mean_accepted: f64,
    pub ttft_ms: f64,
    pub total_ms: f64,
    pub tokens_per_s: f64,
    pub target_busy_ms: f64,
    pub target_idle_ms: f64,
    pub draft_busy_ms: f64,
    pub draft_idle_ms: f64,
    pub gamma_mean: f64,
    /// Rounds by number of branches offered (k).
    pub k_hist: BTreeMap<usize, usize>,
    /// Drafting rounds by draft budget γ.
    pub gamma_hist: BTreeMap<usize, usize>,
    /// Rounds where an offered branch's head matched the drawn token.
    pub branch_hits: usize,
    /// ...of which the matched branch was not the draft's first choice.
    pub alt_branch_hits: usize,
    /// Rounds where branches were offered, the tail was fully accepted, and no head matched.
    pub branch_misses: usize,
    /// Rounds where a tail token was rejected.
    pub rejections: usize,
    pub budget: Option<BudgetReport>,
    /// Per position in the verified tail (0 = first tail token): how often
    /// a token was offered there, and how often it was accepted.
    pub tail_offered_by_pos: Vec<usize>,
    pub tail_accepted_by_pos: Vec<usize>,
    /// Draft calls that failed (the generation went on without them).
    pub draft_failures: usize,
    /// Rounds run target-only because no draft was available.
    pub draftless_rounds: usize,
    /// Bytes of the draft trees as duo.proto carries them (4 per token id,
    /// 8 per proposal entry; framing excluded): what sampled drafting adds
    /// to the wire.
    pub draft_wire_bytes: usize,
}

/// A finished generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// Emitted token ids (EOS included when it ended the generation).
    pub tokens: Vec<u32>,
    pub text: String,
    /// Target log-probabilities of `tokens` (empty unless asked for).
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
    pub stats: Stats,
}

/// The target's side of a generation.
pub trait TargetSide {
    /// Rolls the target's cache back to `keep` tokens, feeds `feed` (whose
    /// last `tail.len()` tokens are the unverified tail) and verifies the
    /// tail next to the logits, with the generation's sampling settings and
    /// seeded RNG (which live on the target side): against `proposals` (the
    /// distributions the tail was sampled from, one per token) with
    /// `min(1, p/q)`, or as a deterministic draft when there are none.
    fn verify(
        &mut self,
        keep: usize,
        feed: &[u32],
        tail: &[u32],
        proposals: &[Distribution],
    ) -> Result<TargetVerdict, EngineError>;
}

/// What a draft side says after a failure (see [`DraftSide::recover`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Ready for jobs again, holding no context: the next job carries a
    /// full sync.
    Ready,
    /// Not now: the loop goes on target-only and asks again next round.
    Later,
    /// The failure ends the generation.
    GiveUp,
}

/// The draft's side of a generation: `submit` starts a drafting job (it may
/// run concurrently with the caller), `collect` waits for its tree.
///
/// Drafts only ever propose: whatever a draft side does or fails to do, the
/// output is decided by the target, so losing a draft never changes it.
pub trait DraftSide {
    fn submit(&mut self, job: DraftJob) -> Result<(), EngineError>;
    fn collect(&mut self) -> Result<DraftTree, EngineError>;
    /// Called after `submit` or `collect` failed with
    /// [`EngineError::Unavailable`], and again each round while the side is
    /// not ready. A side that can move to another worker does so here.
    /// Default: failures are fatal.
    fn recover(&mut self) -> Recovery {
        Recovery::GiveUp
    }
    /// The most tokens the draft model now drafting can hold, if known: the
    /// loop drafts only within it (and goes on target-only beyond), so a
    /// draft with a shorter context than the target's never fails for it.
    fn context_len(&self) -> Option<usize> {
        None
    }
    /// Whether the side holds a draft session now. One that starts without
    /// (no worker was free) is asked to [`Self::recover`] each round until
    /// it has one; its missing rounds are draftless, not failures.
    fn attached(&self) -> bool {
        true
    }
}

/// The loop's view of its draft's health.
struct DraftHealth {
    ready: bool,
    /// The draft holds no context: the next job must carry a full sync.
    fresh: bool,
}

impl DraftHealth {
    /// Handles a failed draft call: `Ok` to go on without this round's
    /// draft, `Err` to end the generation.
    fn failed(
        &mut self,
        d: &mut dyn DraftSide,
        e: EngineError,
        stats: &mut Stats,
    ) -> Result<(), EngineError> {
        if !matches!(e, EngineError::Unavailable(..)) {
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

/// What the loop streams out: new text, the ids of newly emitted tokens and
/// (when asked for) their log-probabilities. Returning `false` cancels the
/// generation.
pub type Sink<'a> = dyn FnMut(&str, &[u32], &[f32]) -> bool + 'a;

/// Limits the loop needs from the models.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The target's context (tokens): prompt + generated must fit it. The
    /// draft's own, possibly shorter, context is its side's
    /// ([`DraftSide::context_len`]).
    pub context_len: usize,
    pub vocab_size: usize,
    pub eos: Option<u32>,
}

/// Checks a request against the models; the message says what to fix.
pub fn validate(
    prompt: &[u32],
    params: &GenerateParams,
    limits: &Limits,
) -> Result<(), EngineError> {
    let bad = |m: String| Err(EngineError::Invalid(m));
    if prompt.is_empty() {
        return bad("the prompt is empty: give at least one token".into());
    }
    if params.max_new_tokens == 0 {
        return bad("max_new_tokens must be at least 1".into());
    }
    if let Some(&t) = prompt.iter().find(|&&t| t as usize >= limits.vocab_size) {
        return bad(format!(
            "token id {t} is outside the vocabulary (size {})",
            limits.vocab_size
        ));
    }
    if prompt.len() + params.max_new_tokens > limits.context_len {
        return bad(format!(
            "prompt of {} tokens plus max_new_tokens {} exceeds the model context of {} tokens: shorten the prompt or lower max_new_tokens",
            prompt.len(),
            params.max_new_tokens,
            limits.context_len
        ));
    }
    params
        .sampling
        .validate()
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
    if let Some(g) = params.gamma
        && !(1..=MAX_GAMMA).contains(&g)
    {
        return bad(format!("gamma must be between 1 and {MAX_GAMMA}, got {g}"));
    }
    if !(1..=crate::spec::policy::MAX_BRANCHES).contains(&params.max_branches) {
        return bad(format!(
            "max_branches must be between 1 and {}, got {}",
            crate::spec::policy::MAX_BRANCHES,
            params.max_branches
        ));
    }
    Ok(())
}

/// Runs one generation to the end.
///
/// `draft` must be `Some` for the speculative modes. `budget` carries the
/// cost estimates across generations (the caller owns it).
#[allow(clippy::too_many_arguments)]
pub fn run(
    target: &mut dyn TargetSide,
    mut draft: Option<&mut dyn DraftSide>,
    tokenizer: &Tokenizer,
    limits: &Limits,
    budget: &mut BudgetController,
    prompt: Vec<u32>,
    params: &GenerateParams,
    sink: &mut Sink<'_>,
) -> Result<Generation, EngineError> {
    validate(&prompt, params, limits)?;
    if params.mode != Mode::Autoregressive && draft.is_none() {
        return Err(EngineError::Invalid(format!(
            "mode {} needs a draft model",
            params.mode
        )));
    }
    let _generation = tracing::info_span!(
        "generation",
        mode = %params.mode,
        prompt_tokens = prompt.len(),
        max_new_tokens = params.max_new_tokens
    )
    .entered();
    let start = Instant::now();
    let mut stats = Stats {
        mode: params.mode,
        prompt_tokens: prompt.len(),
        ..Stats::default()
    };
    let mut round = Round::new(prompt);
    let mut term = Terminator::new(StopConfig {
        max_new_tokens: params.max_new_tokens,
        eos: limits.eos,
        stop_sequences: params.stop.clone(),
    });
    let mut decoder = IncrementalDecoder::new();
    let policy = BranchPolicy::new(params.max_branches);
    let mut emitted: Vec<u32> = Vec::new();
    let mut logprobs: Vec<f32> = Vec::new();
    let mut text = String::new();
    let mut gamma_sum = 0usize;
    let mut draft_rounds = 0usize;
    let mut first_round = true;
    let mut finish = None;
    // A draft side that starts detached holds no context: once it attaches,
    // its first job carries a full sync.
    let attached = draft.as_deref().is_none_or(|d| d.attached());
    let mut health = DraftHealth {
        ready: attached,
        fresh: !attached,
    };

    while finish.is_none() {
        let _round =
            tracing::debug_span!("round", n = stats.rounds, tail = round.tail().len()).entered();
        let remaining = term.remaining();
        // The draft drafts within its own context, which may be shorter
        // than the target's (the generation's limit).
        let draft_limit = draft
            .as_deref()
            .and_then(|d| d.context_len())
            .map_or(limits.context_len, |c| c.min(limits.context_len));
        let room = draft_limit.saturating_sub(round.draft_context_len());
        let keep = round.target_keep();
        // 1. The draft: speculative mode drafts first and waits; duodecoding
        //    starts drafting and lets it run while the target works.
        let mut drafted_now: Option<DraftTree> = None;
        let mut drafting = false;
        let round_start = Instant::now();
        if params.mode != Mode::Autoregressive
            && !health.ready
            && let Some(d) = draft.as_deref_mut()
        {
            health.ready = d.recover() == Recovery::Ready;
        }
        // What the draft must do first (nothing to build when it won't draft).
        let sync = if params.mode == Mode::Autoregressive || !health.ready {
            DraftSync::default()
        } else if health.fresh {
            round.full_draft_sync()
        } else {
            round.draft_sync().clone()
        };
        match (params.mode, draft.as_deref_mut()) {
            (Mode::Autoregressive, _) | (_, None) => {}
            (_, Some(_)) if !health.ready => stats.draftless_rounds += 1,
            (Mode::Speculative, Some(d)) => {
                let gamma = params
                    .gamma
                    .unwrap_or(DEFAULT_SPS_GAMMA)
                    .min(remaining.saturating_sub(1))
                    .min(room.saturating_sub(1));
                if gamma > 0 {
                    let job = DraftJob {
                        sync,
                        gamma,
                        policy: BranchPolicy::new(1),
                        first_verified: true,
                    };
                    match d.submit(job).and_then(|()| d.collect()) {
                        Ok(tree) => {
                            health.fresh = false;
                            // The chain becomes the tail below: its bytes count here.
                            stats.draft_wire_bytes += tree.wire_bytes();
                            stats.target_idle_ms += round_start.elapsed().as_secs_f64() * 1e3;
                            gamma_sum += gamma;
                            *stats.gamma_hist.entry(gamma).or_default() += 1;
                            draft_rounds += 1;
                            let mut chain = tree.branches.first().cloned().unwrap_or_default();
                            chain.truncate(gamma);
                            let mut qs = tree.proposals.first().cloned().unwrap_or_default();
                            qs.truncate(chain.len());
                            round.set_tail(chain, qs)?;
                            // The chain became the tail: no branches for the next token.
                            drafted_now = Some(DraftTree {
                                branches: Vec::new(),
                                proposals: Vec::new(),
                                ..tree
                            });
                        }
                        Err(e) => health.failed(d, e, &mut stats)?,
                    }
                }
            }
            (Mode::Duodecoding, Some(d)) => {
                // The controller balances γ draft steps against the target's
                // forward; the draft also spends one forward catching up on
                // the synced tokens, so it gets one step less.
                let gamma = params
                    .gamma
                    .unwrap_or_else(|| {
                        budget
                            .choose_gamma(round.target_feed_len())
                            .saturating_sub(1)
                            .max(1)
                    })
                    .min(remaining.saturating_sub(round.tail().len() + 1))
                    .min(room);
                if gamma > 0 {
                    match d.submit(DraftJob {
                        sync,
                        gamma,
                        policy,
                        first_verified: false,
                    }) {
                        Ok(()) => {
                            drafting = true;
                            gamma_sum += gamma;
                            *stats.gamma_hist.entry(gamma).or_default() += 1;
                            draft_rounds += 1;
                        }
                        Err(e) => health.failed(d, e, &mut stats)?,
                    }
                }
            }
        }
        // 2. The target verifies the pending tail and draws the next token.
        let verdict = target.verify(
            keep,
            &round.target_feed(),
            round.tail(),
            round.tail_proposals(),
        )?;
        stats.target_busy_ms += verdict.secs * 1e3;
        if params.mode == Mode::Speculative {
            stats.draft_idle_ms += verdict.secs * 1e3;
        }
        if !first_round {
            budget.observe_target(verdict.fed, verdict.secs);
        }
        // 3. Emit what is verified now, before waiting for the draft.
        let committed = round.preview(&verdict.verdict)?;
        let commit = term.commit(&committed, |t| decoder.push(tokenizer, t))?;
        let new = &committed[..commit.accepted];
        let new_logprobs = &verdict.logprobs[..verdict.logprobs.len().min(commit.accepted)];
        logprobs.extend_from_slice(new_logprobs);
        if stats.ttft_ms == 0.0 && !new.is_empty() {
            stats.ttft_ms = start.elapsed().as_secs_f64() * 1e3;
        }
        emitted.extend_from_slice(new);
        text.push_str(&commit.text);
        if (!commit.text.is_empty() || !new.is_empty()) && !sink(&commit.text, new, new_logprobs) {
            return Err(EngineError::Cancelled);
        }
        finish = commit.finish;
        if finish.is_none() && term.remaining() == 0 {
            finish = Some(FinishReason::Length);
        }
        // 4. Collect the draft's branches (unless the generation just ended)
        //    and move to the next round.
        if drafting
            && finish.is_none()
            && let Some(d) = draft.as_deref_mut()
        {
            let waited = Instant::now();
            match d.collect() {
                Ok(tree) => {
                    health.fresh = false;
                    stats.target_idle_ms += waited.elapsed().as_secs_f64() * 1e3;
                    stats.draft_idle_ms +=
                        (round_start.elapsed().as_secs_f64() - tree.secs).max(0.0) * 1e3;
                    drafted_now = Some(tree);
                }
                Err(e) => health.failed(d, e, &mut stats)?,
            }
        }
        let (branches, proposals): (&[Vec<u32>], &[Vec<Distribution>]) = match &drafted_now {
            Some(t) => {
                stats.draft_busy_ms += t.secs * 1e3;
                stats.draft_wire_bytes += t.wire_bytes();
                if t.forward_steps > 0 && !first_round {
                    budget.observe_draft(t.tokens(), t.forward_steps, t.secs);
                }
                (&t.branches, &t.proposals)
            }
            None => (&[], &[]),
        };
        let out = round.apply(verdict.verdict, branches, proposals)?;
        debug_assert_eq!(out.committed, committed);
        // Only verified tokens are ever emitted: the output so far is a
        // prefix of what the round state machine committed.
        debug_assert!(
            round.generated().starts_with(&emitted),
            "an emitted token was not committed"
        );
        first_round = false;
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
            "round done"
        );
    }
    let tail_text = decoder.finish(tokenizer)?;
    let last = term.finish(&tail_text);
    if !last.text.is_empty() {
        text.push_str(&last.text);
        sink(&last.text, &[], &[]);
    }
    let total = start.elapsed().as_secs_f64();
    stats.new_tokens = emitted.len();
    stats.total_ms = total * 1e3;
    stats.tokens_per_s = emitted.len() as f64 / total.max(1e-9);
    stats.mean_accepted = emitted.len() as f64 / stats.rounds.max(1) as f64;
    stats.gamma_mean = gamma_sum as f64 / draft_rounds.max(1) as f64;
    if params.mode == Mode::Duodecoding {
        stats.budget = Some(budget.report());
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
        tokens: emitted,
        text,
        logprobs,
        finish_reason: last.finish.or(finish).unwrap_or(FinishReason::Length),
        stats,
    })
}
