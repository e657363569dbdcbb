//! The verifier: the target model's side of a generation.
//!
//! Keeps the target's context and cache, rolls them back to what the state
//! machine says is verified, feeds the round's tokens and turns the logits of
//! the positions that matter into processed distributions, next to the
//! logits (so no full-vocabulary tensor leaves this side).

use std::time::Instant;

use crate::runtime::{CausalLm, RuntimeError, Sequence};
use crate::sampling::{Rng, SamplingParams};
use crate::spec::verify::{ChainVerdict, verify_deterministic};

/// The target's answer for one round.
#[derive(Debug, Clone)]
pub struct TargetVerdict {
    pub verdict: ChainVerdict,
    /// Log-probabilities (the model's own softmax, temperature 1) of the
    /// committed tokens (accepted tail, then `next`), when asked for.
    pub logprobs: Vec<f32>,
    /// Tokens fed in this forward.
    pub fed: usize,
    /// Wall time of the forward (rollback, logits processing and verification included).
    pub secs: f64,
}

/// The target side of one generation.
pub struct Verifier {
    seq: Sequence,
}

impl Verifier {
    pub fn new(lm: &CausalLm) -> Result<Self, RuntimeError> {
        Ok(Self {
            seq: lm.sequence()?,
        })
    }

    /// Tokens in the target's cache.
    pub fn len(&self) -> usize {
        self.seq.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seq.is_empty()
    }

    /// Rolls the cache back to `keep` tokens, feeds `feed` (whose last
    /// `tail.len()` tokens are the unverified tail) and verifies the tail on
    /// the processed distributions, drawing with `rng`.
    #[allow(clippy::too_many_arguments)]
    pub fn verify(
        &mut self,
        lm: &mut CausalLm,
        keep: usize,
        feed: &[u32],
        tail: &[u32],
        sampling: &SamplingParams,
        rng: &mut Rng,
        want_logprobs: bool,
    ) -> Result<TargetVerdict, RuntimeError> {
        let start = Instant::now();
        if keep > self.seq.len() {
            return Err(RuntimeError::Invalid(format!(
                "verifier asked to keep {keep} tokens but holds {}",
                self.seq.len()
            )));
        }
        if tail.len() >= feed.len() || feed[feed.len() - tail.len()..] != *tail {
            return Err(RuntimeError::Invalid(
                "the tail must be the end of the fed tokens, after at least one verified token"
                    .into(),
            ));
        }
        self.seq.truncate(keep)?;
        let logits = lm.extend(&mut self.seq, feed)?;
        let rows = logits.rows();
        let first = rows - tail.len() - 1;
        let dists: Vec<_> = (first..rows)
            .map(|i| sampling.distribution(logits.row(i)))
            .collect();
        let verdict = verify_deterministic(&dists, tail, rng)
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        let logprobs = if want_logprobs {
            tail[..verdict.accepted]
                .iter()
                .chain(std::iter::once(&verdict.next))
                .enumerate()
                .map(|(i, &t)| log_softmax_at(logits.row(first + i), t))
                .collect()
        } else {
            Vec::new()
        };
        Ok(TargetVerdict {
            verdict,
            logprobs,
            fed: feed.len(),
            secs: start.elapsed().as_secs_f64(),
        })
    }
}

fn log_softmax_at(row: &[f32], token: u32) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f32 = row.iter().map(|&l| (l - max).exp()).sum();
    row.get(token as usize)
        .map_or(f32::NEG_INFINITY, |&l| l - max - z.ln())
}
