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
    pub vocab_size: usize,
    pub has_position_ids: bool,
    /// Maximum context (prompt + generated tokens) from `config.json`, if declared.
    pub context_len: Option<usize>,
    /// End-of-text token from `config.json`, if declared.
    pub eos_token_id: Option<u32>,
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

/// The `config.json` fields the runtime reads.
#[derive(Debug, Default, serde::Deserialize)]
struct HfConfig {
    max_position_embeddings: Option<usize>,
    vocab_size: Option<usize>,
    eos_token_id: Option<serde_json::Value>,
    num_key_value_heads: Option<usize>,
    num_attention_heads: Option<usize>,
    hidden_size: Option<usize>,
    head_dim: Option<usize>,
}

impl CausalLm {
    /// Loads `path`: an `.onnx` file, or a folder holding `model.onnx`
    /// (and usually `config.json`).
    pub fn load(path: &Path, opts: &ModelOptions) -> Result<Self, RuntimeError> {
        let file = if path.is_dir() {
            path.join("model.onnx")
        } else {
            path.to_path_buf()
        };
        if !file.is_file() {
            return Err(RuntimeError::ModelMissing(format!(
                "{} does not exist (the bundled pair lives in models/; remake it with `python models/make.py`)",
                file.display()
            )));
        }
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
            |graph| {
                builder(&env, opts.device, 1)?
                    .commit_from_memory(graph)
                    .map_err(|e| RuntimeError::Ort(format!("loading a cache-edit graph: {e}")))
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
        if let Some(ctx) = self.info.context_len
            && past_len + seq > ctx
        {
            return Err(RuntimeError::Invalid(format!(
                "context of {} tokens exceeds the model's {ctx}",
                past_len + seq
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.info.vocab_size) {
            return Err(RuntimeError::Invalid(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.info.vocab_size
            )));
        }
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
        let placement = self.editor.placement();
        let all_rows = rows >= seq;
        let logits_to = if all_rows {
            &placement.host
        } else {
            &placement.device
        };
        let mut outputs: Vec<(&str, &ort::memory::MemoryInfo<'_>)> =
            Vec::with_capacity(1 + self.present_names.len());
        outputs.push(("logits", logits_to));
        for name in &self.present_names {
            outputs.push((name.as_str(), &placement.device));
        }
        let mut out = run_bound(&mut self.session, &inputs, &outputs)?.into_iter();
        let Some(logits) = out.next() else {
            return Err(RuntimeError::Ort(
                "model produced no `logits` output".into(),
            ));
        };
        let present: Vec<DynValue> = out.collect();
        let logits = if all_rows {
            logits
        } else {
            self.editor.logit_rows(&logits, seq - rows, seq)?
        };
        let logits = extract_logits(&logits, self.info.vocab_size)?;
        self.traffic.forwards += 1;
        self.traffic.to_device_bytes += (host_inputs * std::mem::size_of::<i64>()) as u64;
        self.traffic.to_host_bytes += logits.host_bytes as u64;
        Ok((logits, present))
    }
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

fn extract_logits(v: &DynValue, vocab: usize) -> Result<Logits, RuntimeError> {
    let (data, host_bytes) = match v.try_extract_tensor::<f32>() {
        Ok((_, d)) => (d.to_vec(), std::mem::size_of_val(d)),
        Err(_) => {
            let (_, d) = v.try_extract_tensor::<half::f16>()?;
            (
                d.iter().map(|x| x.to_f32()).collect(),
                std::mem::size_of_val(d),
            )
        }
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

fn read_config(model_file: &Path) -> HfConfig {
    let Some(dir) = model_file.parent() else {
        return HfConfig::default();
    };
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

type Discovered = (ModelInfo, Vec<String>, Vec<String>);

fn discover(
    session: &Session,
    file: &Path,
    config: &HfConfig,
    provider: &'static str,
    intra_threads: usize,
) -> Result<Discovered, RuntimeError> {
    let bad = |reason: String| RuntimeError::Incompatible {
        path: file.display().to_string(),
        reason,
    };
    let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
    let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    for required in ["input_ids", "attention_mask"] {
        if !inputs.contains(&required) {
            return Err(bad(format!("no `{required}` input (inputs: {inputs:?})")));
        }
    }
    if !outputs.contains(&"logits") {
        return Err(bad(format!("no `logits` output (outputs: {outputs:?})")));
    }
    let has_position_ids = inputs.contains(&"position_ids");
    let mut num_layers = 0;
    while inputs.contains(&format!("past_key_values.{num_layers}.key").as_str()) {
        num_layers += 1;
    }
    if num_layers == 0 {
        return Err(bad("no `past_key_values.0.key` input: export the model with its KV cache (e.g. Optimum's text-generation-with-past)".into()));
    }
    let mut past_names = Vec::new();
    let mut present_names = Vec::new();
    for i in 0..num_layers {
        for kind in ["key", "value"] {
            let past = format!("past_key_values.{i}.{kind}");
            let present = format!("present.{i}.{kind}");
            if !inputs.contains(&past.as_str()) {
                return Err(bad(format!("missing input `{past}`")));
            }
            if !outputs.contains(&present.as_str()) {
                return Err(bad(format!("missing output `{present}`")));
            }
            past_names.push(past);
            present_names.push(present);
        }
    }
    let past0 = session
        .inputs()
        .iter()
        .find(|o| o.name() == "past_key_values.0.key")
        .map(|o| o.dtype().clone());
    let Some(ValueType::Tensor { ty, shape, .. }) = past0 else {
        return Err(bad("`past_key_values.0.key` is not a tensor".into()));
    };
    let kv_dtype = match ty {
        TensorElementType::Float32 => KvDType::F32,
        TensorElementType::Float16 => KvDType::F16,
        other => {
            return Err(bad(format!(
                "KV cache of type {other:?}: only float32 and float16 are supported"
            )));
        }
    };
    if shape.len() != 4 {
        return Err(bad(format!(
            "KV cache of rank {}: expected [batch, kv_heads, past, head_dim]",
            shape.len()
        )));
    }
    let cfg_head_dim = config.head_dim.or_else(|| {
        config
            .hidden_size
            .zip(config.num_attention_heads)
            .and_then(|(h, n)| h.checked_div(n))
    });
    let dim = |v: i64, fallback: Option<usize>, what: &str| -> Result<usize, RuntimeError> {
        if v > 0 {
            Ok(v as usize)
        } else {
            fallback.ok_or_else(|| {
                bad(format!(
                    "{what} is dynamic in the graph and config.json does not declare it"
                ))
            })
        }
    };
    let kv_heads = dim(shape[1], config.num_key_value_heads, "the KV head count")?;
    let head_dim = dim(shape[3], cfg_head_dim, "the head dimension")?;
    let logits_shape = session
        .outputs()
        .iter()
        .find(|o| o.name() == "logits")
        .and_then(|o| match o.dtype() {
            ValueType::Tensor { shape, .. } => Some(shape.to_vec()),
            _ => None,
        })
        .unwrap_or_default();
    let vocab_size = dim(
        logits_shape.get(2).copied().unwrap_or(-1),
        config.vocab_size,
        "the vocabulary size",
    )?;
    let eos_token_id = match &config.eos_token_id {
        Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|v| u32::try_from(v).ok()),
        Some(serde_json::Value::Array(a)) => a
            .first()
            .and_then(|v| v.as_u64())
            .and_then(|v| u32::try_from(v).ok()),
        _ => None,
    };
    Ok((
        ModelInfo {
            path: file.to_path_buf(),
            num_layers,
            kv_heads,
            head_dim,
            kv_dtype,
            vocab_size,
            has_position_ids,
            context_len: config.max_position_embeddings,
            eos_token_id,
            provider,
            intra_threads,
        },
        past_names,
        present_names,
    ))
}
