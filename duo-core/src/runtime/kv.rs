//! KV-cache state: [`Sequence`] (one context) and [`Branches`] (k
//! continuations of one context, run as a batch).
//!
//! The cache is kept as ONNX Runtime values on the model's device between
//! runs: each forward's `present.*` outputs are bound to device memory,
//! moved in, and bound back as `past_key_values.*` next run, so the cache
//! never crosses to the host. Structural edits (truncation for rollback,
//! forking k branches, keeping one branch) run on the device too, through
//! the model's [`Editor`] graphs (`runtime::edit`).

use std::sync::Arc;

use ort::value::{DynValue, Tensor};

use super::RuntimeError;
use super::edit::Editor;
use super::model::{KvDType, ModelInfo};

/// The KV tensors of a batch of equal-length contexts.
///
/// Invariants: `values` holds key and value for every layer
/// (`2 * num_layers` tensors, each `[batch, kv_heads, len, head_dim]`), all
/// on the editor's device (the empty cache of a new sequence excepted: it
/// has no elements to place).
pub(crate) struct KvCache {
    pub(crate) values: Vec<DynValue>,
    batch: usize,
    len: usize,
    editor: Arc<Editor>,
}

impl KvCache {
    pub(crate) fn empty(
        info: &ModelInfo,
        batch: usize,
        editor: Arc<Editor>,
    ) -> Result<Self, RuntimeError> {
        let shape = [batch, info.kv_heads, 0, info.head_dim];
        let values = (0..2 * info.num_layers)
            .map(|_| -> Result<DynValue, RuntimeError> {
                Ok(match info.kv_dtype {
                    KvDType::F32 => Tensor::from_array((shape, Vec::<f32>::new()))?.into_dyn(),
                    KvDType::F16 => {
                        Tensor::from_array((shape, Vec::<half::f16>::new()))?.into_dyn()
                    }
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            values,
            batch,
            len: 0,
            editor,
        })
    }

    /// Moves a forward's `present.*` outputs in as the cache of length `len`.
    pub(crate) fn replace(&mut self, present: Vec<DynValue>, len: usize) {
        self.values = present;
        self.len = len;
    }

    /// Keeps the first `n` positions (no-op when `n >= len`).
    fn truncate(&mut self, n: usize) -> Result<(), RuntimeError> {
        if n >= self.len {
            return Ok(());
        }
        self.values = self.editor.slice(&self.values, 0..self.batch, 0..n)?;
        self.len = n;
        Ok(())
    }

    /// A cache of `k` rows, each a copy of row 0.
    fn tile(&self, k: usize) -> Result<Self, RuntimeError> {
        Ok(Self {
            values: self.editor.tile(&self.values, k)?,
            batch: k,
            len: self.len,
            editor: Arc::clone(&self.editor),
        })
    }

    /// A stand-in with no tensors, left behind while the cache is lent out
    /// ([`Sequence::take`]): every model call on it is refused (its inputs
    /// are missing), none panics.
    fn hollow(&self) -> Self {
        Self {
            values: Vec::new(),
            batch: self.batch,
            len: 0,
            editor: Arc::clone(&self.editor),
        }
    }

    /// Row `row`, first `n` positions, as a cache of batch 1.
    fn select(&self, row: usize, n: usize) -> Result<Self, RuntimeError> {
        if row >= self.batch {
            return Err(RuntimeError::Invalid(format!(
                "no branch {row} among {}",
                self.batch
            )));
        }
        let n = n.min(self.len);
        Ok(Self {
            values: self.editor.slice(&self.values, row..row + 1, 0..n)?,
            batch: 1,
            len: n,
            editor: Arc::clone(&self.editor),
        })
    }
}

/// One context and its KV cache.
///
/// Invariant: every token of `tokens` has been fed, i.e. the cache covers
/// exactly `tokens.len()` positions.
pub struct Sequence {
    pub(crate) tokens: Vec<u32>,
    pub(crate) kv: KvCache,
}

impl Sequence {
    pub(crate) fn new(kv: KvCache) -> Self {
        Self {
            tokens: Vec::new(),
            kv,
        }
    }

    /// Tokens in the context.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Moves the sequence out (to run it elsewhere, `runtime::step`),
    /// leaving an empty stand-in whose cache has no tensors until the
    /// sequence is put back.
    pub(crate) fn take(&mut self) -> Sequence {
        let hollow = Sequence {
            tokens: Vec::new(),
            kv: self.kv.hollow(),
        };
        std::mem::replace(self, hollow)
    }

    /// Rolls back to the first `n` tokens (no-op when `n >= len`).
    pub fn truncate(&mut self, n: usize) -> Result<(), RuntimeError> {
        self.kv.truncate(n)?;
        self.tokens.truncate(n);
        Ok(())
    }

    /// A separate sequence holding a copy of this one's first `n` tokens
    /// (all of them when `n >= len`) and their cache, sliced on the device:
    /// a hedge's context, which ends inside the pending tail.
    pub fn prefix(&self, n: usize) -> Result<Sequence, RuntimeError> {
        let n = n.min(self.tokens.len());
        Ok(Sequence {
            tokens: self.tokens[..n].to_vec(),
            kv: self.kv.select(0, n)?,
        })
    }

    /// Forks `k >= 1` branches that all start from this context.
    pub fn fork(&self, k: usize) -> Result<Branches, RuntimeError> {
        if k == 0 {
            return Err(RuntimeError::Invalid(
                "fork needs at least one branch".into(),
            ));
        }
        Ok(Branches {
            base: self.tokens.clone(),
            rows: vec![Vec::new(); k],
            kv: self.kv.tile(k)?,
        })
    }
}

/// `k` continuations of one shared context, advanced together one token per
/// branch per forward (one batched run).
///
/// Invariant: every row has the same number of tokens after `base`, and the
/// cache (batch k) covers `base.len() + rows[j].len()` positions.
pub struct Branches {
    base: Vec<u32>,
    pub(crate) rows: Vec<Vec<u32>>,
    pub(crate) kv: KvCache,
}

impl Branches {
    /// Number of branches.
    pub fn count(&self) -> usize {
        self.rows.len()
    }

    /// Context length of each branch (shared prefix + its own tokens).
    pub fn len(&self) -> usize {
        self.base.len() + self.rows.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves the branches out, as [`Sequence::take`].
    pub(crate) fn take(&mut self) -> Branches {
        let hollow = Branches {
            base: Vec::new(),
            rows: Vec::new(),
            kv: self.kv.hollow(),
        };
        std::mem::replace(self, hollow)
    }

    /// Branch `j`'s own tokens (after the shared context).
    pub fn branch(&self, j: usize) -> &[u32] {
        self.rows.get(j).map_or(&[], Vec::as_slice)
    }

    /// Keeps branch `j` with its first `n` own tokens; drops the others.
    pub fn keep(self, j: usize, n: usize) -> Result<Sequence, RuntimeError> {
        let Some(row) = self.rows.get(j) else {
            return Err(RuntimeError::Invalid(format!(
                "no branch {j} among {}",
                self.rows.len()
            )));
        };
        let n = n.min(row.len());
        let mut tokens = self.base;
        tokens.extend_from_slice(&row[..n]);
        let kv = self.kv.select(j, tokens.len())?;
        Ok(Sequence { tokens, kv })
    }
}
