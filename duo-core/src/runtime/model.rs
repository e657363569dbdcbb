//! [`CausalLm`]: a decoder-only ONNX model with a KV cache, in the Hugging
//! Face Optimum / onnxruntime-genai convention.
//!
//! Inputs `input_ids`, `attention_mask`, optional `position_ids` (int64,
//! `[batch, seq]`) and `past_key_values.{i}.key|value`
//! (`[batch, kv_heads, past, head_dim]`); outputs `logits` and
//! `present.{i}.key|value`. Layer count, KV heads, head dim, KV dtype and
//! vocabulary size are read from the graph (falling back to the
//! `config.json` beside the model for dimensions the graph leaves dynamic).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use super::RuntimeError;
pub use super::discover::resolve_model_file;
use super::discover::{discover, read_config};
use super::edit::{Editor, Placement, run_bound};
use super::kv::{Branches, KvCache, Sequence};
use crate::onnx_graph::onnx::tensor_proto::DataType as OnnxType;

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// CUDA device ordinal. Requires the `cuda` feature and the onnxruntime-gpu library.
    Cuda(i32),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}: use cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    pub device: Device,
    /// ONNX Runtime intra-op threads (>= 1).
    pub intra_threads: usize,
    /// Explicit ONNX Runtime library (else `ORT_DYLIB_PATH`, else the build's `.ort/`).
    pub ort_lib: Option<PathBuf>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            intra_threads: 1,
            ort_lib: None,
        }
    }
}

/// Element type of the KV cache tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDType {
    F32,
    F16,
}

/// What was discovered about a model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub num_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub kv_dtype: KvDType,
    /// Ids below it are fed and sampled: the LM head's rows
    /// ([`Self::padded_vocab_size`]), or the tokenizer's ids after
    /// [`CausalLm::restrict_vocab`] cut a padded head's extra rows off (every
    /// logits row then ends here).
    pub vocab_size: usize,
    /// Rows of the LM head as the graph has them (the logits' last
    /// dimension); more than [`Self::vocab_size`] for a padded head.
    pub padded_vocab_size: usize,
    pub has_position_ids: bool,
    /// Maximum context (prompt + generated tokens), if declared: from
    /// `config.json` under the architecture's name for it
    /// (`max_position_embeddings`, GPT-2's `n_positions`, `n_ctx`,
    /// `seq_length`, ...), else `genai_config.json`'s `model.context_length`.
    pub context_len: Option<usize>,
    /// The first of [`Self::eos_token_ids`], if any (kept for callers that
    /// stop on one id).
    pub eos_token_id: Option<u32>,
    /// Every end-of-text id, in order and without repeats: all of
    /// `generation_config.json`'s `eos_token_id` (a number or a list), then
    /// those of `config.json`, then `genai_config.json`'s `model.eos_token_id`.
    /// Generation stops at any of them (as transformers' `generate` does).
    pub eos_token_ids: Vec<u32>,
    /// The execution provider the session was built with ("CPU" or "CUDA").
    pub provider: &'static str,
    pub intra_threads: usize,
}

/// Logits for a block of positions: `rows` rows of `vocab` values, row-major.
#[derive(Debug, Clone)]
pub struct Logits {
    data: Vec<f32>,
    vocab: usize,
    /// Bytes these rows took in host memory as the model delivered them
    /// (half of `data`'s size for fp16 logits).
    host_bytes: usize,
}

impl Logits {
    /// Number of rows (positions, or batch rows x positions).
    pub fn rows(&self) -> usize {
        self.data.len().checked_div(self.vocab).unwrap_or(0)
    }

    /// Row `i`'s logits. Panics if `i >= rows()` (an internal indexing contract).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }

    /// The last row.
    pub fn last(&self) -> &[f32] {
        self.row(self.rows() - 1)
    }
}

/// Largest logit difference between a block forward and single steps that
/// counts as float rounding, for an fp32 model ([`CausalLm::batch_dependence`]):
/// the near-tie gap, which is defined by that same rounding.
pub const BATCH_TOLERANCE_F32: f32 = crate::speculative::verify::NEAR_TIE_GAP;
/// The same for an fp16 model (its rounding is coarser).
pub const BATCH_TOLERANCE_F16: f32 = crate::speculative::verify::FP16_NEAR_TIE_GAP;

/// What [`CausalLm::batch_dependence`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchDependence {
    /// Largest absolute logit difference between the block forward and the
    /// single steps.
    pub max_abs_diff: f32,
    /// The most that counts as rounding for the model's dtype.
    pub tolerance: f32,
}

impl BatchDependence {
    /// The logits depend on the batch shape beyond rounding: speculative
    /// modes are not bit-lossless for this model.
    pub fn dependent(&self) -> bool {
        self.max_abs_diff > self.tolerance
    }
}

/// One sequence's part of a batched forward ([`CausalLm::extend_batch`]).
pub struct BatchItem<'a> {
    pub seq: &'a mut Sequence,
    /// Tokens fed after the sequence's context (at least one).
    pub tokens: &'a [u32],
    /// Logits rows wanted: those of the last `rows` fed tokens (clamped to
    /// `1..=tokens.len()`).
    pub rows: usize,
}

/// One part of a batched forward ([`CausalLm::extend_parts`]).
pub enum BatchPart<'a> {
    /// One sequence and what it is fed (one batch row).
    Seq(BatchItem<'a>),
    /// Branches, each fed one token (`tokens[j]` to branch j): one batch
    /// row per branch, as [`CausalLm::extend_branches`].
    Branches {
        br: &'a mut Branches,
        tokens: &'a [u32],
    },
}

impl BatchPart<'_> {
    /// Cached positions of each of its batch rows.
    fn context_len(&self) -> usize {
        match self {
            BatchPart::Seq(item) => item.seq.len(),
            BatchPart::Branches { br, .. } => br.len(),
        }
    }

    /// Tokens fed to each of its batch rows.
    fn feed(&self) -> usize {
        match self {
            BatchPart::Seq(item) => item.tokens.len(),
            BatchPart::Branches { .. } => 1,
        }
    }

    /// Batch rows it takes.
    fn batch_rows(&self) -> usize {
        match self {
            BatchPart::Seq(_) => 1,
            BatchPart::Branches { br, .. } => br.count(),
        }
    }

    /// The tokens fed to each of its batch rows.
    fn row_tokens(&self) -> Vec<&[u32]> {
        match self {
            BatchPart::Seq(item) => vec![item.tokens],
            BatchPart::Branches { tokens, .. } => tokens.chunks(1).collect(),
        }
    }

    /// Logits rows wanted per batch row (the last ones fed).
    fn logit_rows(&self) -> usize {
        match self {
            BatchPart::Seq(item) => item.rows,
            BatchPart::Branches { .. } => 1,
        }
    }

    fn kv(&self) -> &KvCache {
        match self {
            BatchPart::Seq(item) => &item.seq.kv,
            BatchPart::Branches { br, .. } => &br.kv,
        }
    }

    /// Takes in the forward's cache (`len` positions) and the fed tokens.
    fn advance(&mut self, kv: Vec<DynValue>, len: usize) {
        match self {
            BatchPart::Seq(item) => {
                item.seq.kv.replace(kv, len);
                item.seq.tokens.extend_from_slice(item.tokens);
            }
            BatchPart::Branches { br, tokens } => {
                br.kv.replace(kv, len);
                for (row, &t) in br.rows.iter_mut().zip(tokens.iter()) {
                    row.push(t);
                }
            }
        }
    }
}

/// A loaded decoder-only model. One session; `&mut self` to run (ONNX
/// Runtime sessions are not used concurrently).
pub struct CausalLm {
    session: Session,
    info: ModelInfo,
    past_names: Vec<String>,
    present_names: Vec<String>,
    editor: Arc<Editor>,
    traffic: HostTraffic,
}

/// What crossed between host memory and the model's device, counted since
/// the model loaded. On the CPU execution provider nothing crosses a bus,
/// but the same code path runs and counts what would: the token ids, mask
/// and positions it binds from host memory, and the logits rows it delivers
/// there. The KV cache never counts: it stays on the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct HostTraffic {
    /// Model forwards run.
    pub forwards: u64,
    /// Bytes bound from host memory as model inputs (ids, mask, positions).
    pub to_device_bytes: u64,
    /// Bytes of logits delivered to host memory.
    pub to_host_bytes: u64,
}

impl std::fmt::Debug for CausalLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CausalLm")
            .field("info", &self.info)
            .finish()
    }
}

impl CausalLm {
    /// Loads `path`: an `.onnx` file, or a folder holding one (a Hugging
    /// Face Optimum export: `model.onnx` [+ `model.onnx_data`], usually
    /// `config.json` and `generation_config.json`; see
    /// [`resolve_model_file`] for which file a folder gives).
    pub fn load(path: &Path, opts: &ModelOptions) -> Result<Self, RuntimeError> {
        let file = resolve_model_file(path)?;
        let config = read_config(&file);
        let env = super::env::init(opts.ort_lib.as_deref())?;
        let threads = opts.intra_threads.max(1);
        let provider = match opts.device {
            Device::Cpu => "CPU",
            Device::Cuda(_) => "CUDA",
        };
        let session = builder(&env, opts.device, threads)?
            .commit_from_file(&file)
            .map_err(|e| match opts.device {
                Device::Cuda(_) => RuntimeError::Provider {
                    provider: "CUDA".into(),
                    reason: format!("{e} (needs the onnxruntime-gpu library via ORT_DYLIB_PATH/--ort-lib and a CUDA 13 driver)"),
                },
                Device::Cpu => RuntimeError::Ort(format!("loading {}: {e}", file.display())),
            })?;
        let (info, past_names, present_names) =
            discover(&session, &file, &config, provider, threads)?;
        let kv_type = match info.kv_dtype {
            KvDType::F32 => OnnxType::Float,
            KvDType::F16 => OnnxType::Float16,
        };
        let logits_type = match output_type(&session, "logits") {
            Some(TensorElementType::Float16) => OnnxType::Float16,
            _ => OnnxType::Float,
        };
        let editor = Editor::new(
            past_names.len(),
            kv_type as i32,
            logits_type as i32,
            Placement::new(opts.device)?,
            {
                let (env, device) = (env.clone(), opts.device);
                move |graph: &[u8]| {
                    builder(&env, device, 1)?
                        .commit_from_memory(graph)
                        .map_err(|e| RuntimeError::Ort(format!("loading a cache-edit graph: {e}")))
                }
            },
        )?;
        tracing::info!(
            model = %file.display(),
            provider,
            threads,
            layers = info.num_layers,
            kv_heads = info.kv_heads,
            head_dim = info.head_dim,
            vocab = info.vocab_size,
            "model loaded"
        );
        Ok(Self {
            session,
            info,
            past_names,
            present_names,
            editor: Arc::new(editor),
            traffic: HostTraffic::default(),
        })
    }

    /// Host traffic since the model loaded.
    pub fn host_traffic(&self) -> HostTraffic {
        self.traffic
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Uses only the first `vocab` ids of the LM head: ids from `vocab` on
    /// are refused as input and every logits row is cut to `vocab` values,
    /// so they are never sampled. For a head padded beyond its tokenizer
    /// (rows no token maps to, e.g. Qwen2.5-7B's 152064 rows for 151665
    /// tokens): pass the tokenizer's id count. `vocab` above the head's
    /// rows ([`ModelInfo::padded_vocab_size`]) or 0 is an error.
    pub fn restrict_vocab(&mut self, vocab: usize) -> Result<(), RuntimeError> {
        if vocab == 0 || vocab > self.info.padded_vocab_size {
            return Err(RuntimeError::Invalid(format!(
                "cannot use {vocab} ids of a vocabulary of {} (the LM head's rows)",
                self.info.padded_vocab_size
            )));
        }
        self.info.vocab_size = vocab;
        Ok(())
    }

    /// Whether this model's logits depend on how many tokens share a
    /// forward: a 4-token block fed after a short dummy context, against the
    /// same 4 tokens fed one at a time. An fp32 model differs by float
    /// rounding (~1e-6); a dynamically quantized (int8) export, whose
    /// activation scales are computed per forward, by up to ~0.1 — then a
    /// verification block (speculative modes) and autoregressive steps can
    /// pick different tokens at near-ties, and the speculative modes are not
    /// bit-lossless for it. A few small forwards.
    pub fn batch_dependence(&mut self) -> Result<BatchDependence, RuntimeError> {
        const CONTEXT: usize = 8;
        const BLOCK: usize = 4;
        let vocab = self.info.vocab_size as u32;
        let ids: Vec<u32> = (0..(CONTEXT + BLOCK) as u32)
            .map(|i| (i * 7 + 3) % vocab.max(1))
            .collect();
        let (context, block) = ids.split_at(CONTEXT);
        let mut seq = self.sequence()?;
        self.extend_last(&mut seq, context, 1)?;
        let together = self.extend(&mut seq, block)?;
        seq.truncate(CONTEXT)?;
        let mut max_abs_diff = 0f32;
        for (i, &t) in block.iter().enumerate() {
            let one = self.extend(&mut seq, &[t])?;
            for (a, b) in together.row(i).iter().zip(one.last()) {
                let d = (a - b).abs();
                // A NaN difference counts as dependence.
                if d.is_nan() || d > max_abs_diff {
                    max_abs_diff = if d.is_nan() { f32::INFINITY } else { d };
                }
            }
        }
        let tolerance = match self.info.kv_dtype {
            KvDType::F32 => BATCH_TOLERANCE_F32,
            KvDType::F16 => BATCH_TOLERANCE_F16,
        };
        Ok(BatchDependence {
            max_abs_diff,
            tolerance,
        })
    }

    /// An empty sequence (no context yet).
    pub fn sequence(&self) -> Result<Sequence, RuntimeError> {
        Ok(Sequence::new(KvCache::empty(
            &self.info,
            1,
            Arc::clone(&self.editor),
        )?))
    }

    /// Feeds `tokens` after the sequence's context; returns one row of logits
    /// per fed token (row i predicts the token after `tokens[i]`). On error
    /// the sequence is unchanged.
    pub fn extend(&mut self, seq: &mut Sequence, tokens: &[u32]) -> Result<Logits, RuntimeError> {
        self.extend_last(seq, tokens, tokens.len())
    }

    /// [`Self::extend`], returning only the logits of the last `rows` fed
    /// tokens (clamped to `1..=tokens.len()`): only those rows reach host
    /// memory (a prefill needs one, a verification of m drafted tokens m+1).
    pub fn extend_last(
        &mut self,
        seq: &mut Sequence,
        tokens: &[u32],
        rows: usize,
    ) -> Result<Logits, RuntimeError> {
        if tokens.is_empty() {
            return Err(RuntimeError::Invalid(
                "extend needs at least one token".into(),
            ));
        }
        let past_len = seq.len();
        let rows = rows.clamp(1, tokens.len());
        let (logits, present) = self.run(&seq.kv, tokens, 1, tokens.len(), past_len, rows)?;
        seq.kv.replace(present, past_len + tokens.len());
        seq.tokens.extend_from_slice(tokens);
        Ok(logits)
    }

    /// Feeds every item's tokens after its own sequence's context in one
    /// forward and returns each item's logits as [`Self::extend_last`]
    /// would (the last `rows` fed tokens' rows), leaving each sequence as
    /// `extend_last` would. [`Self::extend_parts`] with sequences only.
    pub fn extend_batch(
        &mut self,
        items: &mut [BatchItem<'_>],
    ) -> Result<Vec<Logits>, RuntimeError> {
        let mut parts: Vec<BatchPart<'_>> = items
            .iter_mut()
            .map(|it| {
                BatchPart::Seq(BatchItem {
                    seq: &mut *it.seq,
                    tokens: it.tokens,
                    rows: it.rows,
                })
            })
            .collect();
        self.extend_parts(&mut parts)
    }

    /// Runs every part in one forward and returns each part's logits as
    /// its own call would ([`Self::extend_last`] for a sequence,
    /// [`Self::extend_branches`] for branches), leaving each part as that
    /// call would.
    ///
    /// The parts may differ in context length and in tokens fed: the caches
    /// are stacked on the device, each left-padded to the longest context
    /// ([`Editor::stack`]; a part of k branches brings k batch rows of one
    /// length), and the fed tokens right-padded to the longest feed;
    /// `attention_mask` hides every padding position and `position_ids`
    /// place each row's tokens after its own context, so a part's logits
    /// are those of its solo forward up to float rounding (a longer key
    /// axis and a taller matrix change the summation order; the masked keys
    /// get exactly zero weight). After the forward, each part's cache and
    /// logits rows are cut out of the batch on the device.
    ///
    /// One part runs exactly as its own call. A model without a
    /// `position_ids` input (whose positions could not be told apart from
    /// padding) runs the parts one after the other. Every part is checked
    /// before any forward runs; on an error of the forward no part has
    /// changed.
    pub fn extend_parts(
        &mut self,
        parts: &mut [BatchPart<'_>],
    ) -> Result<Vec<Logits>, RuntimeError> {
        if let [part] = parts {
            // The solo forward, which checks its own call.
            return Ok(vec![self.extend_part(part)?]);
        }
        for (i, part) in parts.iter().enumerate() {
            self.check_part(part)
                .map_err(|e| RuntimeError::Invalid(format!("batch part {i}: {e}")))?;
        }
        if parts.is_empty() || !self.info.has_position_ids {
            return parts.iter_mut().map(|p| self.extend_part(p)).collect();
        }
        let lens: Vec<usize> = parts.iter().map(BatchPart::context_len).collect();
        let feeds: Vec<usize> = parts.iter().map(BatchPart::feed).collect();
        let heights: Vec<usize> = parts.iter().map(BatchPart::batch_rows).collect();
        let batch: usize = heights.iter().sum();
        let longest_past = lens.iter().copied().max().unwrap_or(0);
        let longest_feed = feeds.iter().copied().max().unwrap_or(1);
        let total = longest_past + longest_feed;
        let mut ids = Vec::with_capacity(batch * longest_feed);
        let mut mask = Vec::with_capacity(batch * total);
        let mut positions = Vec::with_capacity(batch * longest_feed);
        for ((part, &len), &fed) in parts.iter().zip(&lens).zip(&feeds) {
            for row in part.row_tokens() {
                // Padding feeds the row's last token again at its last
                // position: in range for the model, hidden from every real
                // query.
                let last = row[fed - 1];
                for j in 0..longest_feed {
                    ids.push(i64::from(row.get(j).copied().unwrap_or(last)));
                    positions.push((len + j.min(fed - 1)) as i64);
                }
                mask.extend(std::iter::repeat_n(0i64, longest_past - len));
                mask.extend(std::iter::repeat_n(1i64, len + fed));
                mask.extend(std::iter::repeat_n(0i64, longest_feed - fed));
            }
        }
        let host_inputs = ids.len() + mask.len() + positions.len();
        let ids = Tensor::from_array(([batch, longest_feed], ids))?.into_dyn();
        let mask = Tensor::from_array(([batch, total], mask))?.into_dyn();
        let positions = Tensor::from_array(([batch, longest_feed], positions))?.into_dyn();
        let caches: Vec<&[DynValue]> = parts.iter().map(|p| p.kv().values.as_slice()).collect();
        let past = self.editor.stack(&caches, &lens)?;
        let mut inputs: Vec<(&str, &DynValue)> = Vec::with_capacity(3 + past.len());
        inputs.push(("input_ids", &ids));
        inputs.push(("attention_mask", &mask));
        inputs.push(("position_ids", &positions));
        for (name, v) in self.past_names.iter().zip(&past) {
            inputs.push((name.as_str(), v));
        }
        let (logits, present) = forward_bound(
            &mut self.session,
            &self.editor,
            &self.present_names,
            &inputs,
            false,
        )?;
        // Cut every part out of the batch (one run for the caches, one for
        // the logits rows) before changing any.
        let mut kv_cuts = Vec::with_capacity(parts.len());
        let mut row_cuts = Vec::with_capacity(parts.len());
        let mut top = 0;
        for (b, part) in parts.iter().enumerate() {
            let (len, fed, height) = (lens[b], feeds[b], heights[b]);
            let rows = part.logit_rows().clamp(1, fed);
            let pad = longest_past - len;
            kv_cuts.push((top..top + height, pad..pad + len + fed));
            row_cuts.push((top..top + height, fed - rows..fed));
            top += height;
        }
        let kvs = self.editor.unstack(&present, &kv_cuts)?;
        let rows = self.editor.logit_pieces(&logits, &row_cuts)?;
        let mut cut = Vec::with_capacity(parts.len());
        for (kv, rows) in kvs.into_iter().zip(&rows) {
            cut.push((kv, extract_logits(rows, self.info.vocab_size)?));
        }
        let mut all = Vec::with_capacity(parts.len());
        for ((part, (kv, logits)), (len, fed)) in
            parts.iter_mut().zip(cut).zip(lens.iter().zip(&feeds))
        {
            part.advance(kv, len + fed);
            self.traffic.to_host_bytes += logits.host_bytes as u64;
            all.push(logits);
        }
        self.traffic.forwards += 1;
        self.traffic.to_device_bytes += (host_inputs * std::mem::size_of::<i64>()) as u64;
        Ok(all)
    }

    /// One part's own call.
    fn extend_part(&mut self, part: &mut BatchPart<'_>) -> Result<Logits, RuntimeError> {
        match part {
            BatchPart::Seq(item) => self.extend_last(item.seq, item.tokens, item.rows),
            BatchPart::Branches { br, tokens } => self.extend_branches(br, tokens),
        }
    }

    /// Refuses a part its own call would refuse.
    fn check_part(&self, part: &BatchPart<'_>) -> Result<(), RuntimeError> {
        let (tokens, branches) = match part {
            BatchPart::Seq(item) => (item.tokens, None),
            BatchPart::Branches { br, tokens } => (*tokens, Some(br.count())),
        };
        self.check_feed(part.context_len(), tokens, branches)
    }

    /// Refuses feeding `tokens` after `context` cached positions to one
    /// sequence (`branches` None: at least one token) or one token to each
    /// of `branches` branches, where the call itself would refuse it.
    pub(crate) fn check_feed(
        &self,
        context: usize,
        tokens: &[u32],
        branches: Option<usize>,
    ) -> Result<(), RuntimeError> {
        match branches {
            None if tokens.is_empty() => Err(RuntimeError::Invalid(
                "extend needs at least one token".into(),
            )),
            None => self.check_call(context + tokens.len(), tokens),
            Some(k) if tokens.len() != k => Err(RuntimeError::Invalid(format!(
                "extend_branches got {} tokens for {k} branches",
                tokens.len()
            ))),
            Some(_) => self.check_call(context + 1, tokens),
        }
    }

    /// Refuses a forward that would reach a context of `context` positions
    /// beyond the model's, or feed an id of `tokens` outside its vocabulary.
    fn check_call(&self, context: usize, tokens: &[u32]) -> Result<(), RuntimeError> {
        if let Some(ctx) = self.info.context_len
            && context > ctx
        {
            return Err(RuntimeError::Invalid(format!(
                "context of {context} tokens exceeds the model's {ctx}"
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.info.vocab_size) {
            return Err(RuntimeError::Invalid(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.info.vocab_size
            )));
        }
        Ok(())
    }

    /// Feeds one token to every branch (`tokens[j]` to branch j) as one
    /// batched forward; returns one row of logits per branch.
    pub fn extend_branches(
        &mut self,
        br: &mut Branches,
        tokens: &[u32],
    ) -> Result<Logits, RuntimeError> {
        if tokens.len() != br.count() {
            return Err(RuntimeError::Invalid(format!(
                "extend_branches got {} tokens for {} branches",
                tokens.len(),
                br.count()
            )));
        }
        let past_len = br.len();
        let (logits, present) = self.run(&br.kv, tokens, tokens.len(), 1, past_len, 1)?;
        br.kv.replace(present, past_len + 1);
        for (row, &t) in br.rows.iter_mut().zip(tokens) {
            row.push(t);
        }
        Ok(logits)
    }

    /// One forward of `batch` rows of `seq` new tokens after `past_len`
    /// cached positions: the cache is bound where it lives and the new one
    /// stays on the device; the logits of the last `rows` positions of every
    /// batch row are delivered to host memory (directly when that is all of
    /// them, else selected on the device first).
    fn run(
        &mut self,
        kv: &KvCache,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        past_len: usize,
        rows: usize,
    ) -> Result<(Logits, Vec<DynValue>), RuntimeError> {
        self.check_call(past_len + seq, tokens)?;
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let total = past_len + seq;
        let ids = Tensor::from_array(([batch, seq], ids))?.into_dyn();
        let mask = Tensor::from_array(([batch, total], vec![1i64; batch * total]))?.into_dyn();
        let mut host_inputs = batch * (seq + total);
        let positions = if self.info.has_position_ids {
            let pos: Vec<i64> = (0..batch)
                .flat_map(|_| (past_len as i64)..(total as i64))
                .collect();
            host_inputs += pos.len();
            Some(Tensor::from_array(([batch, seq], pos))?.into_dyn())
        } else {
            None
        };
        let mut inputs: Vec<(&str, &DynValue)> = Vec::with_capacity(3 + kv.values.len());
        inputs.push(("input_ids", &ids));
        inputs.push(("attention_mask", &mask));
        if let Some(p) = &positions {
            inputs.push(("position_ids", p));
        }
        for (name, v) in self.past_names.iter().zip(&kv.values) {
            inputs.push((name.as_str(), v));
        }
        let all_rows = rows >= seq;
        let (logits, present) = forward_bound(
            &mut self.session,
            &self.editor,
            &self.present_names,
            &inputs,
            all_rows,
        )?;
        let logits = if all_rows {
            logits
        } else {
            self.editor.logit_rows(&logits, 0..batch, seq - rows..seq)?
        };
        let logits = extract_logits(&logits, self.info.vocab_size)?;
        self.traffic.forwards += 1;
        self.traffic.to_device_bytes += (host_inputs * std::mem::size_of::<i64>()) as u64;
        self.traffic.to_host_bytes += logits.host_bytes as u64;
        Ok((logits, present))
    }
}

/// Runs a model `session` on `inputs` with the new cache (`present.*`) bound to
/// the device and the logits to host memory when `logits_to_host`
/// (every row is wanted), else to the device (rows are selected there).
fn forward_bound(
    session: &mut Session,
    editor: &Editor,
    present_names: &[String],
    inputs: &[(&str, &DynValue)],
    logits_to_host: bool,
) -> Result<(DynValue, Vec<DynValue>), RuntimeError> {
    let placement = editor.placement();
    let logits_to = if logits_to_host {
        &placement.host
    } else {
        &placement.device
    };
    let mut outputs: Vec<(&str, &ort::memory::MemoryInfo<'_>)> =
        Vec::with_capacity(1 + present_names.len());
    outputs.push(("logits", logits_to));
    for name in present_names {
        outputs.push((name.as_str(), &placement.device));
    }
    let mut out = run_bound(session, inputs, &outputs)?.into_iter();
    let Some(logits) = out.next() else {
        return Err(RuntimeError::Ort(
            "model produced no `logits` output".into(),
        ));
    };
    Ok((logits, out.collect()))
}

/// A session builder for `device` with the runtime's settings: full graph
/// optimisation, `threads` intra-op threads, and the CUDA execution provider
/// (error on failure, never a silent CPU fallback) for a CUDA device.
fn builder(
    env: &Environment,
    device: Device,
    threads: usize,
) -> Result<SessionBuilder, RuntimeError> {
    let builder_err = |e: ort::Error<SessionBuilder>| RuntimeError::Ort(e.to_string());
    let builder = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(builder_err)?
        .with_intra_threads(threads)
        .map_err(builder_err)?
        .with_inter_threads(1)
        .map_err(builder_err)?
        // ONNX Runtime's own messages go through `tracing`; below Warning
        // they are formatted on every run, which costs real time.
        .with_log_level(ort::logging::LogLevel::Warning)
        .map_err(builder_err)?;
    match device {
        Device::Cpu => Ok(builder),
        Device::Cuda(ordinal) => with_cuda(builder, ordinal),
    }
}

/// The element type of a graph output, if it is a tensor.
fn output_type(session: &Session, name: &str) -> Option<TensorElementType> {
    session
        .outputs()
        .iter()
        .find(|o| o.name() == name)
        .and_then(|o| match o.dtype() {
            ValueType::Tensor { ty, .. } => Some(*ty),
            _ => None,
        })
}

#[cfg(feature = "cuda")]
fn with_cuda(
    builder: ort::session::builder::SessionBuilder,
    ordinal: i32,
) -> Result<ort::session::builder::SessionBuilder, RuntimeError> {
    builder
        .with_execution_providers([ort::ep::CUDA::default()
            .with_device_id(ordinal)
            .build()
            .error_on_failure()])
        .map_err(|e| RuntimeError::Provider {
            provider: "CUDA".into(),
            reason: format!(
                "{e} (needs the onnxruntime-gpu 1.31 library via ORT_DYLIB_PATH/--ort-lib, CUDA 13 and cuDNN 9 libraries, and a GPU)"
            ),
        })
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(
    _builder: ort::session::builder::SessionBuilder,
    _ordinal: i32,
) -> Result<ort::session::builder::SessionBuilder, RuntimeError> {
    Err(RuntimeError::Provider {
        provider: "CUDA".into(),
        reason: "this binary was built without the `cuda` feature (rebuild with --features cuda)"
            .into(),
    })
}

/// The logits in `v` as rows of `vocab` values: rows as wide as the
/// tensor's last dimension are taken whole; wider ones (a padded LM head
/// restricted by [`CausalLm::restrict_vocab`]) are cut to their first
/// `vocab` values.
fn extract_logits(v: &DynValue, vocab: usize) -> Result<Logits, RuntimeError> {
    let (width, data, host_bytes) = match v.try_extract_tensor::<f32>() {
        Ok((shape, d)) => (shape.last().copied(), d.to_vec(), std::mem::size_of_val(d)),
        Err(_) => {
            let (shape, d) = v.try_extract_tensor::<half::f16>()?;
            (
                shape.last().copied(),
                d.iter().map(|x| x.to_f32()).collect(),
                std::mem::size_of_val(d),
            )
        }
    };
    let data = match width.and_then(|w| usize::try_from(w).ok()) {
        Some(width) if vocab > 0 && width > vocab && data.len() % width == 0 => data
            .chunks_exact(width)
            .flat_map(|row| &row[..vocab])
            .copied()
            .collect(),
        _ => data,
    };
    if vocab == 0 || data.len() % vocab != 0 {
        return Err(RuntimeError::Ort(format!(
            "logits of {} values do not divide into rows of the vocabulary size {vocab}",
            data.len()
        )));
    }
    Ok(Logits {
        data,
        vocab,
        host_bytes,
    })
}
