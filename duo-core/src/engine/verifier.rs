//! The verifier: the target model's side of a generation.
//!
//! Keeps the target's context and cache, rolls them back to what the state
//! machine says is verified, feeds the round's tokens and turns the logits of
//! the positions that matter into processed distributions, next to the
//! logits (so no full-vocabulary tensor leaves this side).

use std::time::Instant;

use crate::runtime::{CausalLm, RuntimeError, Sequence};
use crate::sampling::{Distribution, SamplingParams};

/// The target's answer for one round.
#[derive(Debug, Clone)]
pub struct TargetPass {
    /// Processed distributions following the last `dists.len()` fed tokens.
    pub dists: Vec<Distribution>,
    /// Tokens fed in this forward.
    pub fed: usize,
    /// Wall time of the forward (rollback and logits processing included).
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

    /// Rolls the cache back to `keep` tokens, feeds `feed`, and returns the
    /// processed distributions of the last `need` positions.
    pub fn pass(
        &mut self,
        lm: &mut CausalLm,
        keep: usize,
        feed: &[u32],
        need: usize,
        sampling: &SamplingParams,
    ) -> Result<TargetPass, RuntimeError> {
        let start = Instant::now();
        if keep > self.seq.len() {
            return Err(RuntimeError::Invalid(format!(
                "verifier asked to keep {keep} tokens but holds {}",
                self.seq.len()
            )));
        }
        self.seq.truncate(keep)?;
        let logits = lm.extend(&mut self.seq, feed)?;
        let rows = logits.rows();
        let need = need.clamp(1, rows);
        let dists = (rows - need..rows)
            .map(|i| sampling.distribution(logits.row(i)))
            .collect();
        Ok(TargetPass {
            dists,
            fed: feed.len(),
            secs: start.elapsed().as_secs_f64(),
        })
    }
}
