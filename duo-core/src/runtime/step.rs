//! The forwards a drafter runs ([`Forwards`]), on the model itself or
//! through a scheduler that runs several drafters' forwards as one batch.
//!
//! A drafter asks for one forward at a time (its sequences and what to
//! feed them). Run alone, that is a call on [`CausalLm`]. Served by a draft
//! worker with many sessions, each session's request becomes a [`Step`]
//! that owns its sequences while it is away (moved out of the drafter and
//! moved back with the result, [`StepClient`]); the worker's scheduler runs
//! every waiting step in one [`run_steps`] call: one forward over all their
//! rows ([`CausalLm::extend_parts`]), each row with its own context length,
//! padding masked, positions explicit. Each step's logits are its solo
//! forward's up to float rounding, and each step gets its own error: a
//! step the model refuses does not fail the others.

use super::model::{BatchItem, BatchPart, CausalLm, Logits};
use super::{Branches, RuntimeError, Sequence};

/// The forward calls of a drafter; see [`CausalLm`] for each.
pub trait Forwards {
    /// [`CausalLm::extend_last`].
    fn extend_last(
        &mut self,
        seq: &mut Sequence,
        tokens: &[u32],
        rows: usize,
    ) -> Result<Logits, RuntimeError>;

    /// [`CausalLm::extend_branches`].
    fn extend_branches(
        &mut self,
        br: &mut Branches,
        tokens: &[u32],
    ) -> Result<Logits, RuntimeError>;

    /// [`CausalLm::extend_batch`].
    fn extend_batch(&mut self, items: &mut [BatchItem<'_>]) -> Result<Vec<Logits>, RuntimeError>;

    /// [`CausalLm::extend`]: every fed token's row.
    fn extend(&mut self, seq: &mut Sequence, tokens: &[u32]) -> Result<Logits, RuntimeError> {
        self.extend_last(seq, tokens, tokens.len())
    }
}

impl Forwards for CausalLm {
    fn extend_last(
        &mut self,
        seq: &mut Sequence,
        tokens: &[u32],
        rows: usize,
    ) -> Result<Logits, RuntimeError> {
        CausalLm::extend_last(self, seq, tokens, rows)
    }

    fn extend_branches(
        &mut self,
        br: &mut Branches,
        tokens: &[u32],
    ) -> Result<Logits, RuntimeError> {
        CausalLm::extend_branches(self, br, tokens)
    }

    fn extend_batch(&mut self, items: &mut [BatchItem<'_>]) -> Result<Vec<Logits>, RuntimeError> {
        CausalLm::extend_batch(self, items)
    }
}

/// One part of a [`Step`], owning what it runs.
enum OwnedPart {
    Seq {
        seq: Sequence,
        tokens: Vec<u32>,
        rows: usize,
    },
    Branches {
        br: Branches,
        tokens: Vec<u32>,
    },
}

impl OwnedPart {
    /// Refuses what its own call would refuse.
    fn check(&self, lm: &CausalLm) -> Result<(), RuntimeError> {
        match self {
            OwnedPart::Seq { seq, tokens, .. } => lm.check_feed(seq.len(), tokens, None),
            OwnedPart::Branches { br, tokens } => lm.check_feed(br.len(), tokens, Some(br.count())),
        }
    }

    fn borrow(&mut self) -> BatchPart<'_> {
        match self {
            OwnedPart::Seq { seq, tokens, rows } => BatchPart::Seq(BatchItem {
                seq,
                tokens,
                rows: *rows,
            }),
            OwnedPart::Branches { br, tokens } => BatchPart::Branches { br, tokens },
        }
    }
}

/// One drafter's forward, away from the drafter: its sequences (moved
/// out, moved back by [`StepClient`]) and what to feed them.
pub struct Step {
    parts: Vec<OwnedPart>,
}

/// A step's logits (one block per part), or why it did not run.
pub type StepResult = Result<Vec<Logits>, RuntimeError>;

impl Step {
    /// Batch rows the step takes (a sequence one, k branches k).
    pub fn batch_rows(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                OwnedPart::Seq { .. } => 1,
                OwnedPart::Branches { br, .. } => br.count(),
            })
            .sum()
    }

    /// The most tokens it feeds one row (a catch-up after a verdict feeds
    /// several; a drafting step one).
    pub fn longest_feed(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                OwnedPart::Seq { tokens, .. } => tokens.len(),
                OwnedPart::Branches { .. } => 1,
            })
            .max()
            .unwrap_or(0)
    }
}

/// Runs `steps` as one batched forward and returns each one's result, in
/// order; each step is left as its own forward would leave it. A step the
/// model refuses (a context too long, an id outside the vocabulary) gets
/// its error and the others run; an error of the forward itself reaches
/// every step that was in it, none of which has changed.
pub fn run_steps(lm: &mut CausalLm, steps: &mut [Step]) -> Vec<StepResult> {
    let mut results: Vec<Option<StepResult>> = steps
        .iter()
        .map(|step| {
            step.parts
                .iter()
                .find_map(|part| part.check(lm).err())
                .map(Err)
        })
        .collect();
    let mut parts: Vec<BatchPart<'_>> = Vec::new();
    let mut counts: Vec<(usize, usize)> = Vec::new();
    for (i, step) in steps.iter_mut().enumerate() {
        if results[i].is_none() {
            counts.push((i, step.parts.len()));
            parts.extend(step.parts.iter_mut().map(OwnedPart::borrow));
        }
    }
    match lm.extend_parts(&mut parts) {
        Ok(logits) => {
            let mut logits = logits.into_iter();
            for (i, n) in counts {
                results[i] = Some(Ok(logits.by_ref().take(n).collect()));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for (i, _) in counts {
                results[i] = Some(Err(RuntimeError::Ort(msg.clone())));
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(RuntimeError::Invalid("step not run".into()))))
        .collect()
}

/// A drafter's [`Forwards`] served elsewhere: each call moves its
/// sequences into a [`Step`], hands it to `send` (which returns once the
/// step has run, e.g. after a scheduler batched it with other sessions'
/// steps), and moves them back. If `send` fails, the step is lost and the
/// sequences are left as empty stand-ins on which every later model call
/// is refused: the drafter's session must end (its error says why).
pub struct StepClient<F> {
    send: F,
}

impl<F> StepClient<F>
where
    F: FnMut(Step) -> Result<(Step, StepResult), RuntimeError>,
{
    pub fn new(send: F) -> Self {
        Self { send }
    }

    fn run(&mut self, parts: Vec<OwnedPart>) -> Result<(Vec<OwnedPart>, StepResult), RuntimeError> {
        let (step, result) = (self.send)(Step { parts })?;
        Ok((step.parts, result))
    }
}

/// The single block of a one-part step.
fn single(result: StepResult) -> Result<Logits, RuntimeError> {
    result?
        .pop()
        .ok_or_else(|| RuntimeError::Invalid("a step came back without logits".into()))
}

impl<F> Forwards for StepClient<F>
where
    F: FnMut(Step) -> Result<(Step, StepResult), RuntimeError>,
{
    fn extend_last(
        &mut self,
        seq: &mut Sequence,
        tokens: &[u32],
        rows: usize,
    ) -> Result<Logits, RuntimeError> {
        let part = OwnedPart::Seq {
            seq: seq.take(),
            tokens: tokens.to_vec(),
            rows,
        };
        let (mut parts, result) = self.run(vec![part])?;
        if let Some(OwnedPart::Seq { seq: back, .. }) = parts.pop() {
            *seq = back;
        }
        single(result)
    }

    fn extend_branches(
        &mut self,
        br: &mut Branches,
        tokens: &[u32],
    ) -> Result<Logits, RuntimeError> {
        let part = OwnedPart::Branches {
            br: br.take(),
            tokens: tokens.to_vec(),
        };
        let (mut parts, result) = self.run(vec![part])?;
        if let Some(OwnedPart::Branches { br: back, .. }) = parts.pop() {
            *br = back;
        }
        single(result)
    }

    fn extend_batch(&mut self, items: &mut [BatchItem<'_>]) -> Result<Vec<Logits>, RuntimeError> {
        let parts = items
            .iter_mut()
            .map(|it| OwnedPart::Seq {
                seq: it.seq.take(),
                tokens: it.tokens.to_vec(),
                rows: it.rows,
            })
            .collect();
        let (parts, result) = self.run(parts)?;
        for (it, part) in items.iter_mut().zip(parts) {
            if let OwnedPart::Seq { seq, .. } = part {
                *it.seq = seq;
            }
        }
        result
    }
}
