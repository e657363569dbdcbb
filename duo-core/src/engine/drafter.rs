//! The proposer: the draft model's side of a generation.
//!
//! Holds the draft model's context and KV cache across rounds, applies the
//! state machine's [`DraftSync`] and drafts token trees with the dynamic
//! multi-sequence policy. Used by the in-process engine (on its own thread)
//! and by the draft service, the same way.

use std::time::Instant;

use serde::Serialize;

use crate::runtime::{BatchItem, Branches, CausalLm, Forwards, RuntimeError, Sequence};
use crate::sampling::{Distribution, Rng, SamplingParams, argmax, top_softmax};
use crate::speculative::policy::{
    BranchPolicy, HEDGE_CANDIDATES, Hedge, MAX_BRANCHES, MAX_HEDGES, hedge_count, rank_hedges,
};
use crate::speculative::round::DraftSync;
use crate::speculative::verify::MAX_PROPOSAL_ENTRIES;
use crate::stats::Ema;

/// Weight of each new step-time sample in [`StepCosts`].
const STEP_COST_ALPHA: f64 = 0.2;

/// Most rows one batched draft step carries: main branches and hedges.
const MAX_ROWS: usize = MAX_BRANCHES + MAX_HEDGES;

/// Tail positions whose acceptance the draft measures (later ones share
/// the last).
const MEASURED_POSITIONS: usize = 32;

/// Weight of each observation in the measured acceptance by tail position.
const ACCEPT_ALPHA: f64 = 0.1;

/// Weight of each drafted token's top probability in the draft's
/// confidence (its stand-in for the acceptance rate, when planning hedges).
const CONFIDENCE_ALPHA: f64 = 0.05;

/// The cost assumed for a batched step of any number of rows before one
/// has been measured, in one-row steps: none extra, so that a row count is
/// tried and then judged by what it measured.
const ASSUMED_STEP_COST: f64 = 1.0;

/// The draft's most likely tokens at one position, with probabilities.
type Candidates = Vec<(u32, f32)>;

/// One drafting request.
#[derive(Debug, Clone)]
pub struct DraftJob {
    pub sync: DraftSync,
    /// Draft budget in one-row forward steps (>= 1): a single chain gets
    /// `gamma` tokens; `k` branches, drafted as one batch, get as many
    /// batched steps as fit in the same time, by the measured cost of a
    /// k-row step against a one-row step (a batched step of k rows costs
    /// more than one row on a CPU: 1.4–2.6× for 4 rows here).
    pub gamma: usize,
    pub policy: BranchPolicy,
    /// The chain's first token will be verified against its proposal
    /// (speculative mode's chain is all tail), rather than matched against
    /// the target's own draw (duodecoding's branch heads): a sampled draft
    /// samples it too instead of taking its most likely tokens.
    pub first_verified: bool,
    /// Most hedges: branches anchored inside the pending tail, for the
    /// likely corrections there (0: none). The draft plans how many pay
    /// for their rows (`policy::hedge_count`).
    pub max_hedges: usize,
}

/// The draft's answer: `branches` continue the synced context (`C + tail`),
/// or, for a hedge, the context up to its anchor; heads are distinct among
/// branches of one anchor; branch 0 is the draft's most likely choice.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DraftTree {
    pub branches: Vec<Vec<u32>>,
    /// Each branch's anchor: `Some(a)` for a hedge, which continues
    /// `C + tail[..a]` with a head other than `tail[a]`; `None` for a branch
    /// after the whole tail. Empty: every branch continues the whole tail.
    pub anchors: Vec<Option<usize>>,
    /// For a sampled draft, the proposal each token was drawn from (one
    /// list per branch, one distribution per token; a head chosen as a most
    /// likely token has a point mass); empty for a greedy draft.
    #[serde(skip)]
    pub proposals: Vec<Vec<Distribution>>,
    /// The drafting's forward calls in one-row step equivalents (a batched
    /// step of k rows counts its measured cost over a one-row step's),
    /// rounded: what the budget controller divides the time by.
    pub forward_steps: usize,
    /// Wall time of the drafting call, sync included.
    pub secs: f64,
}

impl DraftTree {
    pub fn tokens(&self) -> usize {
        self.branches.iter().map(Vec::len).sum()
    }

    /// Bytes of the token ids and proposals as duo.proto carries them (4 per
    /// id, 8 per proposal entry; protobuf framing excluded).
    pub fn wire_bytes(&self) -> usize {
        let entries: usize = self
            .proposals
            .iter()
            .flatten()
            .map(|q| q.entries().len())
            .sum();
        4 * self.tokens() + 8 * entries
    }
}

/// The caches of a multi-branch call's rows.
enum Rows {
    /// Branches forked from the whole context, run as one tiled batch.
    Tiled(Branches),
    /// One sequence per branch, each after its own prefix of the context
    /// (hedges end inside the tail), run as one padded batch.
    Separate(Vec<Sequence>),
}

/// Branches drafted by the last multi-branch call.
struct Multi {
    /// Batched cache of the branch rows (None when every branch is one token
    /// long and nothing was fed).
    rows: Option<Rows>,
    /// Each branch's context length before its head.
    prefix: Vec<usize>,
    /// Each branch's anchor (`Some` for a hedge).
    anchors: Vec<Option<usize>>,
    /// Each branch's tokens (fed ones, then possibly one unfed last token).
    full: Vec<Vec<u32>>,
}

/// The draft side of one generation.
///
/// Invariant: the draft's context is `seq.tokens() + unfed` (plus, while
/// `multi` is set, one of the branches once adopted).
pub struct Drafter {
    seq: Sequence,
    unfed: Vec<u32>,
    multi: Option<Multi>,
    costs: StepCosts,
    /// Sampled drafting: the generation's settings and the draft's own
    /// random stream. `None`: greedy drafts.
    sampling: Option<(SamplingParams, Rng)>,
    /// The last tree's candidates: per branch, per token, the draft's most
    /// likely tokens where it drafted that token.
    drafted: Vec<Vec<Candidates>>,
    /// The candidates of the pending tail (the last `tail.len()` tokens of
    /// the context), when the draft drafted it; empty otherwise.
    tail: Vec<Candidates>,
    /// Mean top probability of drafted tokens.
    confidence: Ema,
    /// The current job may hedge (`max_hedges > 0`): the candidates of its
    /// drafted tokens are kept.
    hedging: bool,
    /// Measured acceptance by tail position: how often the target accepted
    /// the tail token there, given it reached it (learned from the syncs).
    accept: Vec<Ema>,
}

/// The proposal a sampled draft draws from: its processed distribution
/// (the generation's temperature and top-p) over at most
/// [`MAX_PROPOSAL_ENTRIES`] most likely tokens (a top-k of that size, or
/// the request's smaller one). Any proposal keeps verification exact as
/// long as the one sent is the one drawn from; bounding it by top-k also
/// keeps its cost to a partial selection instead of a vocabulary sort.
pub fn proposal(params: &SamplingParams, logits: &[f32]) -> Distribution {
    let top_k = match params.top_k {
        0 => MAX_PROPOSAL_ENTRIES,
        k => k.min(MAX_PROPOSAL_ENTRIES),
    };
    SamplingParams { top_k, ..*params }.distribution(logits)
}

/// How the draft picks each token after a branch head: greedily, or sampled
/// from its proposal (recording the proposal).
enum Pick<'a> {
    Greedy,
    Sampled(&'a SamplingParams, &'a mut Rng),
}

impl Pick<'_> {
    /// The token for `logits`, and the proposal it was drawn from (sampled).
    fn pick(&mut self, logits: &[f32]) -> (u32, Option<Distribution>) {
        match self {
            Pick::Greedy => (argmax(logits), None),
            Pick::Sampled(params, rng) => {
                let q = proposal(params, logits);
                (q.sample(rng), Some(q))
            }
        }
    }
}

/// Measured seconds per one-token forward step, by the number of rows
/// batched (index `rows - 1`), over this session's rounds: `tiled` for
/// branches forked from the whole context, `hedged` for rows after
/// different prefixes (hedges among them: a padded batch, and each row's
/// prefix copied first, which its steps' cost includes).
struct StepCosts {
    tiled: [Ema; MAX_ROWS],
    hedged: [Ema; MAX_ROWS],
}

impl StepCosts {
    fn new() -> Self {
        Self {
            tiled: std::array::from_fn(|_| Ema::new(STEP_COST_ALPHA)),
            hedged: std::array::from_fn(|_| Ema::new(STEP_COST_ALPHA)),
        }
    }

    fn observe(&mut self, rows: usize, secs: f64) {
        if let Some(e) = self.tiled.get_mut(rows.wrapping_sub(1)) {
            e.update(secs);
        }
    }

    fn observe_hedged(&mut self, rows: usize, secs: f64) {
        if let Some(e) = self.hedged.get_mut(rows.wrapping_sub(1)) {
            e.update(secs);
        }
    }

    /// A `rows`-row step's cost in one-row steps (>= 1): measured, else
    /// the per-row slope of the row counts measured so far
    /// ([`Self::estimate`]).
    fn ratio(&self, rows: usize) -> f64 {
        Self::estimate(&self.tiled, None, self.tiled[0].get(), rows)
    }

    /// The same for a step of rows after different prefixes (the tiled
    /// path's slope stands in until one of these is measured).
    fn hedged_ratio(&self, rows: usize) -> f64 {
        Self::estimate(&self.hedged, Some(&self.tiled), self.tiled[0].get(), rows)
    }

    /// The cost of a step of `rows` rows on the path that runs them: tiled
    /// when there are no hedges, else rows after different prefixes.
    fn step_ratio(&self, rows: usize, hedged: bool) -> f64 {
        if hedged {
            self.hedged_ratio(rows)
        } else {
            self.ratio(rows)
        }
    }

    /// `rows`' measured cost over `one`, or `1 + slope · (rows − 1)` with
    /// the steepest per-row slope among the measured counts of `costs`
    /// (else of `fallback`), or [`ASSUMED_STEP_COST`] with none measured.
    fn estimate(costs: &[Ema], fallback: Option<&[Ema]>, one: Option<f64>, rows: usize) -> f64 {
        let Some(one) = one.filter(|&o| o > 0.0) else {
            return ASSUMED_STEP_COST;
        };
        if let Some(many) = costs.get(rows.wrapping_sub(1)).and_then(Ema::get) {
            return (many / one).max(1.0);
        }
        let slope = |costs: &[Ema]| {
            costs
                .iter()
                .enumerate()
                .skip(1)
                .filter_map(|(i, e)| Some(((e.get()? / one - 1.0) / i as f64).max(0.0)))
                .reduce(f64::max)
        };
        match slope(costs).or_else(|| fallback.and_then(slope)) {
            Some(s) => 1.0 + s * rows.saturating_sub(1) as f64,
            None => ASSUMED_STEP_COST,
        }
    }
}

/// Runs `f` and returns its result with the seconds it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed().as_secs_f64())
}

impl Drafter {
    /// A fresh session on `lm` (empty context).
    pub fn new(lm: &CausalLm) -> Result<Self, RuntimeError> {
        Ok(Self {
            seq: lm.sequence()?,
            unfed: Vec::new(),
            multi: None,
            costs: StepCosts::new(),
            sampling: None,
            drafted: Vec::new(),
            tail: Vec::new(),
            confidence: Ema::new(CONFIDENCE_ALPHA),
            hedging: false,
            accept: (0..MEASURED_POSITIONS)
                .map(|_| Ema::new(ACCEPT_ALPHA))
                .collect(),
        })
    }

    /// Drafts by sampling from the draft's processed distribution (the
    /// generation's temperature, top-k, top-p) with `rng`, which must be
    /// independent of the target's stream; greedy settings keep greedy drafts.
    pub fn with_sampling(mut self, params: SamplingParams, rng: Rng) -> Self {
        self.sampling = (!params.is_greedy()).then_some((params, rng));
        self
    }

    /// Context length (tokens the draft believes are in the context).
    pub fn context_len(&self) -> usize {
        self.seq.len() + self.unfed.len()
    }

    /// Applies `sync`, then drafts up to `gamma` tokens in one or more branches.
    pub fn draft(
        &mut self,
        lm: &mut dyn Forwards,
        job: &DraftJob,
    ) -> Result<DraftTree, RuntimeError> {
        let start = Instant::now();
        self.apply(&job.sync)?;
        let max_hedges = if job.first_verified {
            0
        } else {
            job.max_hedges.min(MAX_HEDGES)
        };
        // A fallback chain (first_verified) is hedged by the job after it.
        self.hedging = job.max_hedges > 0;
        let mut tree = self.propose(
            lm,
            job.gamma.max(1),
            job.policy,
            max_hedges,
            job.first_verified,
        )?;
        tree.secs = start.elapsed().as_secs_f64();
        Ok(tree)
    }

    /// Applies `sync`. Adopting branch `j` of the last tree makes its
    /// tokens after the head the pending tail, whose candidates the draft
    /// keeps for hedging; any other change leaves no tail it drafted.
    fn apply(&mut self, sync: &DraftSync) -> Result<(), RuntimeError> {
        self.observe_verdict(sync);
        let context_before = self.context_len();
        let multi = self.multi.take();
        let drafted = std::mem::take(&mut self.drafted);
        let mut adopted_len = None;
        if let Some(j) = sync.adopt {
            if let Some(m) = multi {
                let (Some(full), Some(&prefix)) = (m.full.get(j), m.prefix.get(j)) else {
                    return Err(RuntimeError::Invalid(format!(
                        "sync adopts branch {j} of {}",
                        m.full.len()
                    )));
                };
                match m.rows {
                    Some(Rows::Tiled(rows)) => {
                        let fed = rows.branch(j).len().min(full.len());
                        self.seq = rows.keep(j, fed)?;
                        self.unfed = full[fed..].to_vec();
                    }
                    Some(Rows::Separate(mut seqs)) if j < seqs.len() => {
                        let seq = seqs.swap_remove(j);
                        let fed = seq.len().saturating_sub(prefix).min(full.len());
                        self.seq = seq;
                        self.unfed = full[fed..].to_vec();
                    }
                    Some(Rows::Separate(_)) => {
                        return Err(RuntimeError::Invalid(format!("no row for branch {j}")));
                    }
                    None => {
                        self.seq.truncate(prefix)?;
                        self.unfed = full.clone();
                    }
                }
            }
            // (adopting the single chain of a one-branch draft is a no-op: the
            // chain is already the end of the context.)
            adopted_len = Some(self.context_len());
        }
        let fed = self.seq.len();
        if sync.keep < fed {
            self.seq.truncate(sync.keep)?;
            self.unfed.clear();
        } else {
            self.unfed.truncate(sync.keep - fed);
        }
        self.unfed.extend_from_slice(&sync.append);
        // The adopted branch, whole, is the context's end: its tokens after
        // the head are the tail, with the candidates drafted for them. A
        // sync that changes nothing after a single chain (duodecoding's
        // fallback chain, which the target verifies whole) makes the whole
        // chain the tail.
        let unchanged = sync.adopt.is_none()
            && sync.append.is_empty()
            && sync.keep == context_before
            && drafted.len() == 1;
        self.tail = match (sync.adopt, adopted_len) {
            (Some(j), Some(len)) if len == self.context_len() => drafted
                .into_iter()
                .nth(j)
                .map(|mut c| {
                    c.drain(..1.min(c.len()));
                    c
                })
                .unwrap_or_default(),
            (None, _) if unchanged => drafted.into_iter().next().unwrap_or_default(),
            _ => Vec::new(),
        };
        if self.tail.len() > self.context_len() {
            self.tail.clear();
        }
        Ok(())
    }

    /// Learns how much of the pending tail the target accepted from the
    /// sync that follows its verification: adopting a branch after the
    /// tail means all of it, adopting a hedge means up to its anchor, and
    /// keeping `keep` tokens means `keep` minus the context before the tail.
    fn observe_verdict(&mut self, sync: &DraftSync) {
        let m = self.tail.len();
        if m == 0 {
            return;
        }
        let before_tail = self.context_len().saturating_sub(m);
        let accepted = match (sync.adopt, &self.multi) {
            (Some(j), Some(multi)) => multi.anchors.get(j).copied().flatten().unwrap_or(m),
            (Some(_), None) => m,
            (None, _) if sync.keep >= before_tail && sync.append.len() == 1 => {
                (sync.keep - before_tail).min(m)
            }
            (None, _) => return,
        };
        let last = self.accept.len() - 1;
        for i in 0..accepted {
            self.accept[i.min(last)].update(1.0);
        }
        if accepted < m {
            self.accept[accepted.min(last)].update(0.0);
        }
    }

    /// The measured acceptance at each of the first `m` tail positions.
    fn measured_acceptance(&self, m: usize) -> Vec<Option<f32>> {
        let last = self.accept.len() - 1;
        (0..m)
            .map(|i| self.accept[i.min(last)].get().map(|p| p as f32))
            .collect()
    }

    /// Feeds what is unfed and returns the logits row for the next position.
    fn catch_up(&mut self, lm: &mut dyn Forwards) -> Result<Vec<f32>, RuntimeError> {
        if self.unfed.is_empty() {
            // Re-feed the last token to get its logits.
            let n = self.seq.len();
            if n == 0 {
                return Err(RuntimeError::Invalid(
                    "the draft has an empty context".into(),
                ));
            }
            self.unfed.push(self.seq.tokens()[n - 1]);
            self.seq.truncate(n - 1)?;
        }
        let logits = lm.extend_last(&mut self.seq, &self.unfed, 1)?;
        self.unfed.clear();
        Ok(logits.last().to_vec())
    }

    /// The hedges worth drafting beside `heads` this round (none without a
    /// tail the draft drafted, or when `max_hedges` is 0): the ranked
    /// likely corrections of the tail, as many as pay for their rows at the
    /// measured step costs.
    fn plan_hedges(
        &self,
        tail: &[u32],
        first: &[(u32, f32)],
        heads: usize,
        gamma: usize,
        max_hedges: usize,
    ) -> Vec<Hedge> {
        if max_hedges == 0 || self.tail.is_empty() || self.tail.len() != tail.len() {
            return Vec::new();
        }
        let accept = self.measured_acceptance(tail.len());
        let (mut ranked, survive) = rank_hedges(tail, &self.tail, &accept);
        ranked.truncate(max_hedges);
        let main_chance = survive * first.iter().take(heads).map(|e| e.1).sum::<f32>();
        let alpha = self.confidence.get().unwrap_or(0.5);
        let n = hedge_count(main_chance, &ranked, heads, gamma, alpha, |rows| {
            self.costs.step_ratio(rows, rows > heads)
        });
        ranked.truncate(n);
        ranked
    }

    /// The candidates kept for a drafted token picked from `logits`
    /// (the draft's top [`HEDGE_CANDIDATES`]); updates the confidence.
    /// Nothing when this job does not hedge (its cost, a softmax over the
    /// vocabulary per drafted token, is then saved).
    fn candidates(&mut self, logits: &[f32]) -> Candidates {
        if !self.hedging {
            return Vec::new();
        }
        let c = top_softmax(logits, HEDGE_CANDIDATES);
        if let Some(&(_, p)) = c.first() {
            self.confidence.update(f64::from(p));
        }
        c
    }

    fn propose(
        &mut self,
        lm: &mut dyn Forwards,
        gamma: usize,
        policy: BranchPolicy,
        max_hedges: usize,
        first_verified: bool,
    ) -> Result<DraftTree, RuntimeError> {
        let q1_logits = self.catch_up(lm)?;
        let sampled = self.sampling.is_some();
        let c1 = self.candidates(&q1_logits);
        let mut steps = 1;
        // The first token: sampled when it will be verified against its
        // proposal; else the most likely (matched against the target's draw).
        let (x1, q_x1) = if first_verified {
            self.pick(&q1_logits)
        } else {
            let x = argmax(&q1_logits);
            (x, sampled.then(|| Distribution::point(x)))
        };
        let tail_tokens = {
            let ctx = self.seq.tokens();
            ctx[ctx.len().saturating_sub(self.tail.len())..].to_vec()
        };
        if gamma == 1 && policy.cap() == 1 {
            self.unfed.push(x1);
            self.drafted = vec![vec![c1]];
            return Ok(tree(vec![vec![x1]], q_x1.map(|q| vec![vec![q]]), steps));
        }
        // Probe: one step to learn p21.
        let (l2, secs) = timed(|| lm.extend(&mut self.seq, &[x1]));
        let l2 = l2?;
        self.costs.observe(1, secs);
        steps += 1;
        let q1 = top_softmax(&q1_logits, MAX_BRANCHES);
        let p21 = top_softmax(l2.last(), 1).first().map_or(1.0, |e| e.1);
        let k = if first_verified {
            1
        } else {
            policy.branch_count(&q1, p21)
        };
        let hedges = self.plan_hedges(&tail_tokens, &q1, k, gamma, max_hedges);
        if k <= 1 && hedges.is_empty() {
            let mut chain = vec![x1];
            let mut cands = vec![c1];
            let mut qs: Vec<Distribution> = q_x1.into_iter().collect();
            let mut logits = l2;
            let (mut next, mut q_next) = self.pick(logits.last());
            while chain.len() < gamma {
                cands.push(self.candidates(logits.last()));
                chain.push(next);
                qs.extend(q_next.take());
                if chain.len() == gamma {
                    self.unfed.push(next);
                    break;
                }
                let (l, secs) = timed(|| lm.extend(&mut self.seq, &[next]));
                let l = l?;
                self.costs.observe(1, secs);
                steps += 1;
                logits = l;
                (next, q_next) = self.pick(logits.last());
            }
            self.drafted = vec![cands];
            return Ok(tree(vec![chain], sampled.then(|| vec![qs]), steps));
        }
        // Several rows: drop the probe token, fork from the context (main
        // branches) and from inside the tail (hedges).
        self.seq.truncate(self.seq.len() - 1)?;
        let heads = policy.branch_heads(&q1, k);
        let context = self.seq.len();
        let m = tail_tokens.len();
        let mut rows: Vec<(usize, u32)> = heads.iter().map(|&h| (m, h)).collect();
        rows.extend(hedges.iter().map(|h| (h.anchor, h.head)));
        let count = rows.len();
        // The γ − 1 one-row steps a single chain would take after its head,
        // spent on batched steps of `count` rows at their measured cost.
        let ratio = self.costs.step_ratio(count, !hedges.is_empty());
        let batched_steps = (((gamma - 1) as f64 / ratio).floor() as usize).min(gamma - 1);
        let longest = 1 + batched_steps;
        let mut full: Vec<Vec<u32>> = rows.iter().map(|&(_, h)| vec![h]).collect();
        // A main head's candidates are the first position's; a hedge's head
        // is the target's draw there, never hedged.
        let mut cands: Vec<Vec<Candidates>> = rows
            .iter()
            .map(|&(a, _)| vec![if a == m { c1.clone() } else { Vec::new() }])
            .collect();
        let mut qs: Vec<Vec<Distribution>> = rows
            .iter()
            .map(|&(_, h)| {
                sampled
                    .then(|| Distribution::point(h))
                    .into_iter()
                    .collect()
            })
            .collect();
        let prefix: Vec<usize> = rows.iter().map(|&(a, _)| context - m + a).collect();
        let mut toks: Vec<u32> = rows.iter().map(|&(_, h)| h).collect();
        let batch = if longest == 1 {
            None
        } else if hedges.is_empty() {
            let mut tiled = self.seq.fork(count)?;
            for _ in 1..longest {
                let (l, secs) = timed(|| lm.extend_branches(&mut tiled, &toks));
                let l = l?;
                self.costs.observe(count, secs);
                for (j, t) in toks.iter_mut().enumerate() {
                    *t = self.extend_row(l.row(j), &mut full[j], &mut cands[j], &mut qs[j]);
                }
            }
            Some(Rows::Tiled(tiled))
        } else {
            let (seqs, setup) = timed(|| {
                prefix
                    .iter()
                    .map(|&n| self.seq.prefix(n))
                    .collect::<Result<Vec<_>, _>>()
            });
            let mut seqs = seqs?;
            let setup_per_step = setup / batched_steps.max(1) as f64;
            for _ in 1..longest {
                let mut items: Vec<BatchItem<'_>> = seqs
                    .iter_mut()
                    .zip(&toks)
                    .map(|(seq, t)| BatchItem {
                        seq,
                        tokens: std::slice::from_ref(t),
                        rows: 1,
                    })
                    .collect();
                let (l, secs) = timed(|| lm.extend_batch(&mut items));
                let l = l?;
                self.costs.observe_hedged(count, secs + setup_per_step);
                for (j, t) in toks.iter_mut().enumerate() {
                    let row = l.get(j).map_or(&[][..], |r| r.last());
                    *t = self.extend_row(row, &mut full[j], &mut cands[j], &mut qs[j]);
                }
            }
            Some(Rows::Separate(seqs))
        };
        // Accounted at the ratio just measured (this round's steps included).
        let ratio = self.costs.step_ratio(count, !hedges.is_empty());
        steps += (batched_steps as f64 * ratio).round() as usize;
        let anchors = if hedges.is_empty() {
            Vec::new()
        } else {
            rows.iter().map(|&(a, _)| (a < m).then_some(a)).collect()
        };
        self.multi = Some(Multi {
            rows: batch,
            prefix,
            anchors: anchors.clone(),
            full: full.clone(),
        });
        self.drafted = cands;
        let mut t = tree(full, sampled.then_some(qs), steps);
        t.anchors = anchors;
        Ok(t)
    }

    /// The token picked for `logits` and its proposal (sampled drafts).
    fn pick(&mut self, logits: &[f32]) -> (u32, Option<Distribution>) {
        match &mut self.sampling {
            Some((params, rng)) => Pick::Sampled(params, rng).pick(logits),
            None => Pick::Greedy.pick(logits),
        }
    }

    /// Picks a row's next token from its `logits` and records it, its
    /// candidates and its proposal; returns it (to feed next step).
    fn extend_row(
        &mut self,
        logits: &[f32],
        full: &mut Vec<u32>,
        cands: &mut Vec<Candidates>,
        qs: &mut Vec<Distribution>,
    ) -> u32 {
        let (next, q_next) = self.pick(logits);
        cands.push(self.candidates(logits));
        full.push(next);
        qs.extend(q_next);
        next
    }
}

fn tree(
    branches: Vec<Vec<u32>>,
    proposals: Option<Vec<Vec<Distribution>>>,
    forward_steps: usize,
) -> DraftTree {
    DraftTree {
        branches,
        anchors: Vec::new(),
        proposals: proposals.unwrap_or_default(),
        forward_steps,
        secs: 0.0,
    }
}
