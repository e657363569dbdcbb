//! The proposer: the draft model's side of a generation.
//!
//! Holds the draft model's context and KV cache across rounds, applies the
//! state machine's [`DraftSync`] and drafts token trees with the dynamic
//! multi-sequence policy. Used by the in-process engine (on its own thread)
//! and by the draft service, the same way.

use std::time::Instant;

use serde::Serialize;

use crate::runtime::{Branches, CausalLm, RuntimeError, Sequence};
use crate::sampling::{Distribution, Rng, SamplingParams, argmax, top_softmax};
use crate::speculative::policy::{BranchPolicy, MAX_BRANCHES};
use crate::speculative::round::DraftSync;
use crate::speculative::verify::MAX_PROPOSAL_ENTRIES;
use crate::stats::Ema;

/// Weight of each new step-time sample in [`StepCosts`].
const STEP_COST_ALPHA: f64 = 0.2;

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
}

/// The draft's answer: `branches` continue the synced context; heads are
/// distinct; branch 0 is the draft's most likely choice.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DraftTree {
    pub branches: Vec<Vec<u32>>,
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

/// Branches drafted by the last multi-branch call.
struct Multi {
    /// Batched cache of the branch rows (None when every branch is one token
    /// long and nothing was fed).
    rows: Option<Branches>,
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
/// batched (index `rows - 1`), over this session's rounds.
struct StepCosts([Ema; MAX_BRANCHES]);

impl StepCosts {
    fn new() -> Self {
        Self(std::array::from_fn(|_| Ema::new(STEP_COST_ALPHA)))
    }

    fn observe(&mut self, rows: usize, secs: f64) {
        if let Some(e) = self.0.get_mut(rows.wrapping_sub(1)) {
            e.update(secs);
        }
    }

    /// A `rows`-row step's cost in one-row steps (>= 1), once both are measured.
    fn ratio(&self, rows: usize) -> Option<f64> {
        let one = self.0[0].get()?;
        let many = self.0.get(rows.wrapping_sub(1))?.get()?;
        (one > 0.0).then(|| (many / one).max(1.0))
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
    pub fn draft(&mut self, lm: &mut CausalLm, job: &DraftJob) -> Result<DraftTree, RuntimeError> {
        let start = Instant::now();
        self.apply(&job.sync)?;
        let mut tree = self.propose(lm, job.gamma.max(1), job.policy, job.first_verified)?;
        tree.secs = start.elapsed().as_secs_f64();
        Ok(tree)
    }

    fn apply(&mut self, sync: &DraftSync) -> Result<(), RuntimeError> {
        let multi = self.multi.take();
        if let Some(j) = sync.adopt
            && let Some(m) = multi
        {
            let Some(full) = m.full.get(j) else {
                return Err(RuntimeError::Invalid(format!(
                    "sync adopts branch {j} of {}",
                    m.full.len()
                )));
            };
            match m.rows {
                Some(rows) => {
                    let fed = rows.branch(j).len().min(full.len());
                    self.seq = rows.keep(j, fed)?;
                    self.unfed = full[fed..].to_vec();
                }
                None => self.unfed = full.clone(),
            }
        }
        // (adopting the single chain of a one-branch draft is a no-op: the
        // chain is already the end of the context.)
        let fed = self.seq.len();
        if sync.keep < fed {
            self.seq.truncate(sync.keep)?;
            self.unfed.clear();
        } else {
            self.unfed.truncate(sync.keep - fed);
        }
        self.unfed.extend_from_slice(&sync.append);
        Ok(())
    }

    /// Feeds what is unfed and returns the logits row for the next position.
    fn catch_up(&mut self, lm: &mut CausalLm) -> Result<Vec<f32>, RuntimeError> {
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

    fn propose(
        &mut self,
        lm: &mut CausalLm,
        gamma: usize,
        policy: BranchPolicy,
        first_verified: bool,
    ) -> Result<DraftTree, RuntimeError> {
        let q1_logits = self.catch_up(lm)?;
        let mut pick = match &mut self.sampling {
            Some((params, rng)) => Pick::Sampled(params, rng),
            None => Pick::Greedy,
        };
        let sampled = matches!(pick, Pick::Sampled(..));
        let mut steps = 1;
        // The first token: sampled when it will be verified against its
        // proposal; else the most likely (matched against the target's draw).
        let (x1, q_x1) = if first_verified {
            pick.pick(&q1_logits)
        } else {
            let x = argmax(&q1_logits);
            (x, sampled.then(|| Distribution::point(x)))
        };
        if gamma == 1 && policy.cap() == 1 {
            self.unfed.push(x1);
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
        if k <= 1 {
            let mut chain = vec![x1];
            let mut qs: Vec<Distribution> = q_x1.into_iter().collect();
            let (mut next, mut q_next) = pick.pick(l2.last());
            while chain.len() < gamma {
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
                (next, q_next) = pick.pick(l.last());
            }
            return Ok(tree(vec![chain], sampled.then(|| vec![qs]), steps));
        }
        // Several branches: drop the probe token, fork from the context.
        self.seq.truncate(self.seq.len() - 1)?;
        let heads = policy.branch_heads(&q1, k);
        // The γ − 1 one-row steps a single chain would take after its head,
        // spent on batched steps of k rows at their measured cost.
        let ratio = self.costs.ratio(heads.len()).unwrap_or(1.0);
        let batched_steps = (((gamma - 1) as f64 / ratio).floor() as usize).min(gamma - 1);
        let longest = 1 + batched_steps;
        let mut full: Vec<Vec<u32>> = heads.iter().map(|&h| vec![h]).collect();
        let mut qs: Vec<Vec<Distribution>> = heads
            .iter()
            .map(|&h| {
                sampled
                    .then(|| Distribution::point(h))
                    .into_iter()
                    .collect()
            })
            .collect();
        let rows = if longest > 1 {
            let mut rows = self.seq.fork(heads.len())?;
            let mut toks = heads.clone();
            for _ in 1..longest {
                let (l, secs) = timed(|| lm.extend_branches(&mut rows, &toks));
                let l = l?;
                self.costs.observe(heads.len(), secs);
                for (j, ((f, q), t)) in full.iter_mut().zip(&mut qs).zip(&mut toks).enumerate() {
                    let (next, q_next) = pick.pick(l.row(j));
                    *t = next;
                    f.push(next);
                    q.extend(q_next);
                }
            }
            Some(rows)
        } else {
            None
        };
        // Accounted at the ratio just measured (this round's steps included).
        let ratio = self.costs.ratio(heads.len()).unwrap_or(1.0);
        steps += (batched_steps as f64 * ratio).round() as usize;
        self.multi = Some(Multi {
            rows,
            full: full.clone(),
        });
        Ok(tree(full, sampled.then_some(qs), steps))
    }
}

fn tree(
    branches: Vec<Vec<u32>>,
    proposals: Option<Vec<Vec<Distribution>>>,
    forward_steps: usize,
) -> DraftTree {
    DraftTree {
        branches,
        proposals: proposals.unwrap_or_default(),
        forward_steps,
        secs: 0.0,
    }
}
