//! One generation's speculative loop, for all three modes, over two seams:
//! [`TargetSide`] and [`DraftSide`]. The in-process engine implements them
//! with local models and a draft thread; the orchestrator implements them
//! with gRPC streams. The loop is the same, so the services run exactly the
//! algorithm the in-process tests prove lossless.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::EngineError;
use super::drafter::{DraftJob, DraftTree};
use super::rounds::GenerationLoop;
use super::verifier::TargetVerdict;
use crate::sampling::{Distribution, SamplingParams};
use crate::speculative::budget::{BudgetController, BudgetReport};
use crate::speculative::round::RoundKind;
use crate::speculative::stop::FinishReason;
use crate::tokenizer::Tokenizer;

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
    /// Most hedges per duodecoding round: branches for the likely
    /// corrections inside the pending tail. `None`: up to
    /// [`DEFAULT_MAX_HEDGES`] while the target verifies a tail for about
    /// the cost of one token (measured; a weight-bound target, as on a
    /// GPU), else none. `Some(n)`: up to `n` whatever the target (0
    /// disables hedged drafting).
    pub max_hedges: Option<usize>,
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

/// Hedges per duodecoding round when a request names none.
pub const DEFAULT_MAX_HEDGES: usize = 4;

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
            max_hedges: None,
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
    /// Draft tokens the target verified (pending tails; branch heads, which
    /// are matched against the target's own draw, not counted).
    pub drafted: usize,
    /// Draft tokens the target accepted: each round commits these plus one
    /// token of its own, so `rounds + accepted` is the tokens committed
    /// (the tokens emitted, unless a stop cut the last round short).
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
    /// Hedges offered: branches anchored inside the pending tail.
    pub hedges: usize,
    /// Rounds whose drawn token matched a hedge (the tail was rejected
    /// there): the next round verifies the hedge's tail, not a lone token.
    pub hedge_hits: usize,
    /// Rounds that committed a single token.
    pub single_token_rounds: usize,
    /// Duodecoding rounds that drafted a short serial chain first, because
    /// they would otherwise have verified a lone token.
    pub fallback_chains: usize,
    /// Rounds and the tokens they committed, by where the round's tail came
    /// from (`lone`: none; `branch`, `hedge`, `chain`).
    pub round_kinds: BTreeMap<RoundKind, KindCount>,
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

/// Rounds of one kind and the tokens they committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KindCount {
    pub rounds: usize,
    pub tokens: usize,
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
    /// Called after `submit` or `collect` failed with a side error
    /// ([`EngineError::Side`]), and again each round while the side is not
    /// ready. A side that can move to another worker does so here.
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

/// What the loop streams out: new text, the ids of newly emitted tokens and
/// (when asked for) their log-probabilities. Returning `false` cancels the
/// generation.
pub type Sink<'a> = dyn FnMut(&str, &[u32], &[f32]) -> bool + 'a;

/// Limits the loop needs from the models.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The target's context (tokens): prompt + generated must fit it. The
    /// draft's own, possibly shorter, context is its side's
    /// ([`DraftSide::context_len`]).
    pub context_len: usize,
    /// Ids below it are fed and sampled (the tokenizer's ids: a padded LM
    /// head's extra rows are cut off, see `CausalLm::restrict_vocab`).
    pub vocab_size: usize,
    /// The target's end-of-text ids (`ModelInfo::eos_token_ids`, else the
    /// tokenizer's end-of-text token): the generation stops at any of them.
    pub eos: Vec<u32>,
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
    if !(1..=crate::speculative::policy::MAX_BRANCHES).contains(&params.max_branches) {
        return bad(format!(
            "max_branches must be between 1 and {}, got {}",
            crate::speculative::policy::MAX_BRANCHES,
            params.max_branches
        ));
    }
    if let Some(h) = params.max_hedges
        && h > crate::speculative::policy::MAX_HEDGES
    {
        return bad(format!(
            "max_hedges must be between 0 and {}, got {h}",
            crate::speculative::policy::MAX_HEDGES
        ));
    }
    Ok(())
}

/// Runs one generation to the end: validates it, then the named steps of
/// `engine/rounds.rs` — `start`, `round` until the generation ends (each
/// round: `prepare_draft` and `draft`, the target's `verify`, `emit` of the
/// verified tokens to `sink`, `collect` of the draft's tree, `advance` of
/// the round state machine), then `finish`.
///
/// `draft` must be `Some` for the speculative modes. `budget` carries the
/// cost estimates across generations (the caller owns it).
#[allow(clippy::too_many_arguments)]
pub fn run(
    target: &mut dyn TargetSide,
    draft: Option<&mut dyn DraftSide>,
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
    // (The draft's trait object is reborrowed for the loop's lifetime.)
    let draft = draft.map(|d| d as &mut dyn DraftSide);
    let mut generation =
        GenerationLoop::start(target, draft, tokenizer, limits, budget, prompt, params);
    let mut finish = None;
    while finish.is_none() {
        finish = generation.round(sink)?;
    }
    generation.finish(finish, sink)
}
