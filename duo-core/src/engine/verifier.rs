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

use crate::runtime::{BatchItem, CausalLm, Logits, RuntimeError, Sequence};
use crate::sampling::{Distribution, Rng, SamplingParams, log_softmax_at};
use crate::speculative::verify::{ChainVerdict, verify_deterministic, verify_sampled};

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
        }?;
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
        let block = VerifyBlock {
            verifier: self,
            keep,
            feed,
            tail,
            since: Instant::now(),
        };
        forward_batch(lm, &mut [block])
            .pop()
            .unwrap_or_else(|| Err(RuntimeError::Invalid("no forward ran".into())))
    }

    /// Checks a block against this verifier's cache and rolls the cache back
    /// to `keep` tokens.
    fn prepare(&mut self, keep: usize, feed: &[u32], tail: &[u32]) -> Result<(), RuntimeError> {
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
        self.seq.truncate(keep)
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

/// One verifier's round in a batched forward ([`forward_batch`]): roll back
/// to `keep` tokens, then feed `feed`, whose last `tail.len()` tokens are the
/// unverified tail.
pub struct VerifyBlock<'a> {
    pub verifier: &'a mut Verifier,
    pub keep: usize,
    pub feed: &'a [u32],
    pub tail: &'a [u32],
    /// When the round was asked for: the verdict's `secs` counts from here,
    /// so time spent queued for a shared model is part of the round cost
    /// the draft budget learns.
    pub since: Instant,
}

/// Runs the rounds of several verifiers (of different sessions, context
/// lengths and block sizes) as one batched forward of `lm`
/// ([`CausalLm::extend_batch`]) and returns each one's [`Forward`], in
/// order. Each block is checked and rolled back on its own: a malformed
/// block gets its error and the others still run. When the batched forward
/// itself fails, the blocks are run one at a time, so a failure stays with
/// the block that causes it.
pub fn forward_batch(
    lm: &mut CausalLm,
    blocks: &mut [VerifyBlock<'_>],
) -> Vec<Result<Forward, RuntimeError>> {
    let mut results: Vec<Option<Result<Forward, RuntimeError>>> = blocks
        .iter_mut()
        .map(|b| b.verifier.prepare(b.keep, b.feed, b.tail).err().map(Err))
        .collect();
    let ready: Vec<usize> = (0..blocks.len())
        .filter(|&i| results[i].is_none())
        .collect();
    // Only the rows judged: the last verified token's and the tail's.
    let wanted = |b: &VerifyBlock<'_>| b.tail.len() + 1;
    let run = |lm: &mut CausalLm, chosen: &mut [&mut VerifyBlock<'_>]| {
        let mut items: Vec<BatchItem<'_>> = chosen
            .iter_mut()
            .map(|b| BatchItem {
                rows: wanted(b),
                seq: &mut b.verifier.seq,
                tokens: b.feed,
            })
            .collect();
        lm.extend_batch(&mut items)
    };
    let mut chosen: Vec<&mut VerifyBlock<'_>> = blocks
        .iter_mut()
        .zip(&results)
        .filter(|(_, r)| r.is_none())
        .map(|(b, _)| b)
        .collect();
    let logits: Vec<Result<Logits, RuntimeError>> = match run(lm, &mut chosen) {
        Ok(all) => all.into_iter().map(Ok).collect(),
        Err(e) if chosen.len() <= 1 => vec![Err(e)],
        Err(_) => chosen
            .iter_mut()
            .map(|b| {
                run(lm, std::slice::from_mut(b)).and_then(|mut one| {
                    one.pop()
                        .ok_or_else(|| RuntimeError::Invalid("no logits".into()))
                })
            })
            .collect(),
    };
    for ((b, i), logits) in chosen.iter().zip(&ready).zip(logits) {
        results[*i] = Some(logits.and_then(|logits| {
            let wanted = wanted(b);
            let Some(first) = logits.rows().checked_sub(wanted) else {
                return Err(RuntimeError::Invalid(format!(
                    "the target returned {} logits rows, {wanted} needed",
                    logits.rows(),
                )));
            };
            Ok(Forward {
                logits,
                first,
                tail: b.tail.to_vec(),
                fed: b.feed.len(),
                start: b.since,
            })
        }));
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(RuntimeError::Invalid("block not run".into()))))
        .collect()
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
