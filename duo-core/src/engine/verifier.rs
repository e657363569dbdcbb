//! The verifier: the target model's side of a generation.
//!
//! Keeps the target's context and cache, rolls them back to what the state
//! machine says is verified, feeds the round's tokens and turns the logits of
//! the positions that matter into processed distributions, next to the
//! logits (so no full-vocabulary tensor leaves this side).
//!
//! A round is two steps: [`Verifier::forward`] needs the model (rollback and
//! forward) and returns a [`Forward`]; [`Forward::judge`] needs only the
//! logits (distributions, verification, log-probabilities). A worker that
//! shares one model between sessions holds it for the forward alone;
//! [`Verifier::verify`] runs both.

use std::time::Instant;

use crate::runtime::{CausalLm, Logits, RuntimeError, Sequence};
use crate::sampling::{Distribution, Rng, SamplingParams, log_softmax_at};
use crate::spec::verify::{ChainVerdict, verify_deterministic, verify_sampled};

/// The target's answer for one round.
#[derive(Debug, Clone)]
pub struct TargetVerdict {
    pub verdict: ChainVerdict,
    /// Log-probabilities (the model's own softmax, temperature 1) of the
    /// committed tokens (accepted tail, then `next`), when asked for.
    pub logprobs: Vec<f32>,
    /// Tokens fed in this forward.
    pub fed: usize,
    /// Wall time of the whole verification: rollback, forward, logits
    /// processing and verification, from the start of [`Verifier::forward`]
    /// (so not counting a wait for a shared model's lock) to the end of
    /// [`Forward::judge`].
    pub secs: f64,
}

/// A round's forward, not yet judged: the logits of the last fed tokens
/// (the last verified one and the unverified tail) and the tail. Holds no
/// reference to the model.
#[derive(Debug)]
pub struct Forward {
    logits: Logits,
    /// Row of the last verified token: its logits give the distribution of
    /// `tail[0]`, the next rows those of the following tail tokens, the
    /// last row that of the token after the tail.
    first: usize,
    tail: Vec<u32>,
    fed: usize,
    start: Instant,
}

impl Forward {
    /// Verifies the tail on the processed distributions (one per tail token
    /// plus one for the token after it) — with [`verify_sampled`] against
    /// `proposals` (one per tail token: what each was sampled from), or with
    /// [`verify_deterministic`] when there are none — drawing with `rng`,
    /// and adds the committed tokens' log-probabilities when `want_logprobs`.
    pub fn judge(
        self,
        sampling: &SamplingParams,
        proposals: &[Distribution],
        rng: &mut Rng,
        want_logprobs: bool,
    ) -> Result<TargetVerdict, RuntimeError> {
        let rows = self.first..=self.first + self.tail.len();
        let dists: Vec<_> = rows
            .map(|i| sampling.distribution(self.logits.row(i)))
            .collect();
        let verdict = if proposals.is_empty() {
            verify_deterministic(&dists, &self.tail, rng)
        } else {
            verify_sampled(&dists, &self.tail, proposals, rng)
        }
        .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        let logprobs = if want_logprobs {
            self.tail[..verdict.accepted]
                .iter()
                .chain(std::iter::once(&verdict.next))
                .enumerate()
                .map(|(i, &t)| log_softmax_at(self.logits.row(self.first + i), t))
                .collect()
        } else {
            Vec::new()
        };
        Ok(TargetVerdict {
            verdict,
            logprobs,
            fed: self.fed,
            secs: self.start.elapsed().as_secs_f64(),
        })
    }
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

    /// Rolls the cache back to `keep` tokens and feeds `feed`, whose last
    /// `tail.len()` tokens are the unverified tail (after at least one
    /// verified token); the result is judged with [`Forward::judge`], which
    /// needs no model. On an error the cache may have been rolled back.
    pub fn forward(
        &mut self,
        lm: &mut CausalLm,
        keep: usize,
        feed: &[u32],
        tail: &[u32],
    ) -> Result<Forward, RuntimeError> {
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
        // Only the rows judged: the last verified token's and the tail's.
        let wanted = tail.len() + 1;
        let logits = lm.extend_last(&mut self.seq, feed, wanted)?;
        let Some(first) = logits.rows().checked_sub(wanted) else {
            return Err(RuntimeError::Invalid(format!(
                "the target returned {} logits rows, {wanted} needed",
                logits.rows(),
            )));
        };
        Ok(Forward {
            logits,
            first,
            tail: tail.to_vec(),
            fed: feed.len(),
            start,
        })
    }

    /// [`Self::forward`] then [`Forward::judge`]: rolls back, feeds `feed`
    /// (whose last `tail.len()` tokens are the unverified tail) and verifies
    /// the tail on the processed distributions (against `proposals`, if
    /// any), drawing with `rng`.
    #[allow(clippy::too_many_arguments)]
    pub fn verify(
        &mut self,
        lm: &mut CausalLm,
        keep: usize,
        feed: &[u32],
        tail: &[u32],
        proposals: &[Distribution],
        sampling: &SamplingParams,
        rng: &mut Rng,
        want_logprobs: bool,
    ) -> Result<TargetVerdict, RuntimeError> {
        self.forward(lm, keep, feed, tail)?
            .judge(sampling, proposals, rng, want_logprobs)
    }
}

#[cfg(test)]
mod tests {
    /// A forward owns what judging needs (no borrow of the model or the
    /// verifier), so a worker can release a shared model before judging,
    /// on any thread.
    #[test]
    fn a_forward_outlives_the_model_borrow() {
        fn owned_and_sendable<T: Send + 'static>() {}
        owned_and_sendable::<super::Forward>();
    }
}
